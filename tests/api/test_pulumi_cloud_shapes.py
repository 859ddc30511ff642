"""pulumid's answers against Pulumi Cloud's own OpenAPI (../shared/reference): for every
operation both describe with a JSON response schema, a real answer validates against it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from pulumid.api.base import app
from tests.api.test_api import ORG, Server, b64, serve
from tests.api.test_reliability_api import deployment, start_update

pytestmark = pytest.mark.live

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
OPENAPI = REFERENCE / "pulumi-cloud-openapi.json"
BASE = f"/api/stacks/{ORG}/web/dev"


def _open_api_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable` as JSON Schema's null type; the rest carries over."""
    if isinstance(node, dict):
        out = {k: _open_api_to_json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_open_api_to_json_schema(v) for v in node]
    return node


def _normal(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", path))


def _reference() -> tuple[dict[tuple[str, str], dict[str, Any]], Registry]:
    if not OPENAPI.is_file():
        pytest.fail(f"{OPENAPI} is missing (../shared beside the repository)", pytrace=False)
    document = _open_api_to_json_schema(json.loads(OPENAPI.read_text()))
    operations = {
        (_normal(path), method.upper()): op
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict)
    }
    registry = Registry().with_resource("pulumi", Resource.opaque(document))
    return operations, registry


def _schema(op: dict[str, Any]) -> dict[str, Any] | None:
    for status in ("200", "201"):
        content = op.get("responses", {}).get(status, {}).get("content", {})
        schema = (content.get("application/json") or {}).get("schema")
        if schema and schema != {"type": "object"}:
            ref = schema.get("$ref")
            return {"$ref": "pulumi" + ref} if ref else schema
    return None


async def _world(server: Server) -> dict[str, Any]:
    """A stack with tags, a finished update, a token; returns what requests need."""
    await server.ok("POST", f"/api/stacks/{ORG}/web", {"stackName": "dev", "tags": {"a": "b"}})
    update_id, token = await start_update(server, BASE)
    auth = f"update-token {token}"
    body = deployment([{"urn": "urn:pulumi:dev::web::t::r", "type": "t", "custom": True}])
    await server.ok("PATCH", f"{BASE}/update/{update_id}/checkpoint", body, auth=auth)
    await server.ok(
        "POST", f"{BASE}/update/{update_id}/complete", {"status": "succeeded"}, auth=auth
    )
    ciphertext = (await server.ok("POST", f"{BASE}/encrypt", {"plaintext": b64(b"s")}))[
        "ciphertext"
    ]
    await server.backend.auth.audit.flush()
    return {"ciphertext": ciphertext}


def _requests(world: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/api/user", None),
        ("GET", "/api/user/organizations/default", None),
        ("GET", "/api/capabilities", None),
        ("GET", "/api/registry/templates", None),
        ("GET", "/api/registry/packages", None),
        ("GET", f"/api/orgs/{ORG}/members", None),
        ("GET", f"/api/orgs/{ORG}/teams", None),
        ("GET", f"/api/orgs/{ORG}/roles", None),
        ("GET", f"/api/orgs/{ORG}/auditlogs", None),
        ("GET", "/api/user/stacks", None),
        ("POST", f"/api/stacks/{ORG}/other", {"stackName": "two"}),
        ("GET", BASE, None),
        ("GET", f"{BASE}/export", None),
        ("GET", f"{BASE}/export/1", None),
        ("GET", f"{BASE}/updates/latest", None),
        ("GET", f"{BASE}/updates/1", None),
        ("GET", f"{BASE}/updates/1/summary", None),
        ("POST", "/api/user/tokens", {"description": "ci", "expires": 0}),
        ("GET", "/api/user/tokens", None),
    ]


@pytest_twisted.ensureDeferred
async def test_answers_validate_against_pulumi_clouds_schemas(tmp_path: Path) -> None:
    operations, registry = _reference()
    ours = {
        (_normal(rule.rule), rule.endpoint.rsplit(":", 1)[1]) for rule in app.url_map.iter_rules()
    }
    shared = {key for key in ours if key in operations and _schema(operations[key])}
    validated: set[tuple[str, str]] = set()
    problems = []
    async with serve(tmp_path) as server:
        world = await _world(server)
        for method, path, body in _requests(world):
            key = (_normal(path.replace(ORG, "{o}")), method)
            # The most literal template wins (.../updates/latest over .../updates/{version}).
            candidates = sorted(shared, key=lambda k: k[0].count("{}"))
            key = next((k for k in candidates if _matches(k, method, path)), key)
            schema = _schema(operations[key]) if key in operations else None
            assert schema is not None, f"{method} {path}: not an operation both describe"
            answer = await server.ok(method, path, body)
            validator = Draft202012Validator(schema, registry=registry)
            errors = sorted(validator.iter_errors(answer), key=lambda e: list(e.path))
            problems += [f"{method} {path}: {list(e.path)}: {e.message}" for e in errors[:3]]
            validated.add(key)
    assert not problems, "\n".join(problems)
    # Every operation both describe with a JSON schema was checked, except: the token exchange
    # (tests/auth), rename and import (no body in pulumid's 204), HEAD (no body), and the four
    # secrets routes, whose reference schemas describe Go's []byte as an integer array while
    # the CLI (Go's encoding/json) sends and expects base64 strings (tests/e2e).
    unchecked = sorted(shared - validated)
    skipped = ("/rename", "/import", "/oauth/token", "crypt")
    odd = [(p, v) for p, v in unchecked if not (p.endswith(skipped) or v == "HEAD")]
    assert not odd, odd
    assert len(validated) >= 18


def _matches(key: tuple[str, str], method: str, path: str) -> bool:
    template, verb = key
    if verb != method:
        return False
    pattern = "^" + re.escape(template).replace(re.escape("{}"), "[^/]+") + "$"
    return re.match(pattern, path) is not None
