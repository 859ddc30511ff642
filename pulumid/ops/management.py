"""The management listener: /healthz (alive), /readyz (able to serve), /metrics (Prometheus).

It is a site of its own on its own port (loopback by default), so probes and scrapers never
need an API token and the API port never exposes internals.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from pulumid.ops.metrics import Metrics

# A readiness check: None when fine, else why not.
Check = Callable[[], Awaitable[str | None]]


class Management:
    app = Klein()

    def __init__(self, metrics: Metrics, checks: dict[str, Check]) -> None:
        self.metrics = metrics
        self.checks = checks

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        failures: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                why = await check()
            except Exception as e:  # a check that breaks is a check that failed
                why = f"{type(e).__name__}: {e}"
            if why:
                failures[name] = why
        if failures:
            return _json(request, 503, {"status": "not ready", "failing": failures})
        return _json(request, 200, {"status": "ready", "checks": sorted(self.checks)})

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)

    def site(self) -> Site:
        site = Site(self.app.resource())
        site.displayTracebacks = False
        site.noisy = False
        return site


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()
