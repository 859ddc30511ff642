"""Per-request accounting: Prometheus request metrics and the access log line.

The API's Site calls `log` once per answered request. The route template (not the path, so
stack names do not explode the label space) is set by the route wrapper in pulumid.api.base;
requests that matched no route count as "unmatched".
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Site

from pulumid.api.channel import GuardedChannel, PeerLimit
from pulumid.ops.metrics import Metrics

log = Logger()
access = Logger(namespace="pulumid.access")


class APISite(PeerLimit, Site):
    """The API's Site: guarded connections (pulumid.api.channel), security headers, and each
    request counted when it has been answered, then logged."""

    metrics: Metrics | None = None
    protocol = GuardedChannel  # type: ignore[assignment]  # HTTP/1.1 only, no h2 upgrade

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", ""))
        if not self.admit(host):
            log.info("refused a connection from {peer}: too many open", peer=host)
            return None
        channel = super().buildProtocol(addr)
        if channel is None:
            self.release(host)
            return None
        channel.peer_host = host
        return channel

    def log(self, request: Any) -> None:
        started = getattr(request, "started", None)
        elapsed = time.monotonic() - started if started is not None else 0.0
        method = request.method.decode("ascii", "replace")
        route = getattr(request, "route", None) or "unmatched"
        status = int(getattr(request, "code", 0) or 0)
        if self.metrics is not None:
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
        principal = getattr(request, "principal", None)
        # The path names stacks and updates, never a credential (those are in headers).
        path = request.uri.split(b"?", 1)[0].decode("utf-8", "replace")
        access.info(
            '{client_ip} "{method} {path} {version}" {status} {bytes} {latency_ms:.1f}ms {user}',
            log_type="access",
            method=method,
            route=route,
            path=path,
            version=request.clientproto.decode("ascii", "replace"),
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            bytes=int(getattr(request, "sentLength", 0) or 0),
            user=getattr(principal, "login", "") or "-",
            client_ip=str(getattr(request.getClientAddress(), "host", "")),
        )
