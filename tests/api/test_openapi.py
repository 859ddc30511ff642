"""GET /api/openapi: generated from the route table, so every route is in it as it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytest_twisted

from pulumid.api.base import NEEDS, app
from tests.api.test_api import serve

pytestmark = pytest.mark.live


@pytest_twisted.ensureDeferred
async def test_every_route_is_described(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        reply = await server.call("GET", "/api/openapi", auth=None)  # public
        assert reply.code == 200
        doc = reply.json()
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    described = {
        (path, method.upper()) for path, operations in paths.items() for method in operations
    }
    expected = set()
    for rule in app.url_map.iter_rules():
        method = rule.endpoint.rsplit(":", 1)[1]
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        expected.add((path, method))
    assert described == expected
    assert len(described) == len(NEEDS)

    update = "/api/stacks/{org}/{project}/{stack}/{kind}/{update_id}"
    checkpoint = paths[update + "/checkpoint"]["patch"]
    assert checkpoint["security"] == [{"updateToken": []}]
    kind = next(p for p in checkpoint["parameters"] if p["name"] == "kind")
    assert kind["schema"]["enum"] == ["update", "preview", "refresh", "destroy"]
    delete = paths["/api/stacks/{org}/{project}/{stack}"]["delete"]
    assert delete["x-pulumid-need"] == {"scope": "stack", "role": "admin"}
    assert delete["x-pulumid-audit-action"] == "stack.delete"
    assert {"401", "403", "404", "409"} <= set(delete["responses"])
    assert paths["/api/oauth/token"]["post"]["security"] == []
    assert "401" not in paths["/api/oauth/token"]["post"]["responses"]
    user = paths["/api/user"]["get"]
    assert user["security"] == [{"token": []}]
    shape = user["responses"]["200"]["content"]["application/json"]["schema"]
    assert "githubLogin" in shape["required"] and shape["properties"]["organizations"]
    create = paths["/api/stacks/{org}/{project}"]["post"]["requestBody"]
    assert create["required"] and create["content"]["application/json"]["schema"]["required"] == [
        "stackName"
    ]
    assert paths["/api/openapi"]["get"]["summary"].startswith("This API's OpenAPI")
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["code", "message"]
