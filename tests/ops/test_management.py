"""The management listener: health, readiness and Prometheus metrics of a live daemon."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.python.usage import UsageError

from pulumid import __version__
from pulumid.config import Config, Options, plain_http_beyond_loopback
from pulumid.engine.backend import Backend
from pulumid.tap import make_management
from tests.api.test_api import TOKEN, Server, serve

pytestmark = pytest.mark.live


@asynccontextmanager
async def management(server: Server) -> AsyncIterator[str]:
    backend: Backend = server.backend
    site = make_management(backend, backend.secrets).site()
    port: IListeningPort = cast(Any, reactor).listenTCP(0, site, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    try:
        yield f"http://127.0.0.1:{address.port}"
    finally:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping


async def get(url: str) -> tuple[int, str, str]:
    response = await treq.get(url, persistent=False)
    body = await response.text()
    return response.code, response.headers.getRawHeaders("content-type", [""])[0], body


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text; fails when it is absent."""
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{metrics}")


@pytest_twisted.ensureDeferred
async def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, management(server) as url:
        assert (await get(url + "/healthz"))[0] == 200
        code, _, body = await get(url + "/readyz")
        assert code == 200 and "database" in body and "master_key" in body, body
        assert "schema" in body
        await server.ok("GET", "/api/user")
        await server.ok("GET", "/api/user")
        await server.ok("POST", "/api/stacks/acme/web", {"stackName": "dev"})
        (await server.call("GET", "/api/no/such/route")).assert_error(404)
        (await server.call("GET", "/api/user", auth=None)).assert_error(401)

        code, content_type, metrics = await get(url + "/metrics")
        assert code == 200 and content_type.startswith("text/plain"), content_type
        requests = "pulumid_http_requests_total"
        assert sample(metrics, requests, method="GET", route="/api/user", status="200") == 2
        assert sample(metrics, requests, method="GET", route="/api/user", status="401") == 1
        assert sample(metrics, requests, route="/api/stacks/{org}/{project}", status="200") == 1
        assert sample(metrics, requests, route="unmatched", status="404") == 1
        latency = "pulumid_http_request_duration_seconds_count"
        assert sample(metrics, latency, method="GET", route="/api/user") == 3
        assert sample(metrics, "pulumid_db_transaction_duration_seconds_count") >= 1
        assert sample(metrics, "pulumid_thread_pool_queue_depth", pool="db") == 0
        assert sample(metrics, "pulumid_thread_pool_busy_threads", pool="cpu") >= 0
        assert sample(metrics, "pulumid_build_info", version=__version__) == 1
        assert sample(metrics, "pulumid_running", kind="updates") == 0
        # No label carries a stack name: routes are templates.
        assert "dev" not in re.findall(r'route="([^"]*)"', metrics)

        # The database goes away: not ready, and says why.
        server.backend.store.close()
        code, _, body = await get(url + "/readyz")
        assert code == 503 and "database" in body, body
        assert (await get(url + "/healthz"))[0] == 200


def test_plain_http_beyond_loopback_is_refused_unless_asked_for() -> None:
    def parse(*args: str) -> Config:
        options = Options()
        options.parseOptions(["--token", TOKEN, *args])
        config: Config = options.config
        return config

    assert parse().management_listen == "tcp:9090:interface=127.0.0.1"
    with pytest.raises(UsageError, match="plain HTTP beyond this machine"):
        parse("--listen", "tcp:8080")
    with pytest.raises(UsageError, match="--insecure-http"):
        parse("--listen", "tcp:8080:interface=0.0.0.0")
    assert parse("--listen", "tcp:8080", "--insecure-http").insecure_http
    assert parse("--listen", "unix:/run/pulumid.sock").listen == ("unix:/run/pulumid.sock",)
    assert not plain_http_beyond_loopback("tcp6:8080:interface=\\:\\:1")
    assert plain_http_beyond_loopback("tcp:interface=10.1.2.3:port=8080")
    assert not plain_http_beyond_loopback("ssl:443:privateKey=key.pem")
