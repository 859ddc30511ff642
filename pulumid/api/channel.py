"""Connections that cannot be held open by slow or hostile clients.

- A request's headers must arrive within `header_timeout` of its first byte, and its body
  within `body_timeout` of its headers (slowloris, slow POST): past that, the connection is
  dropped. Nothing waits on a thread meanwhile; the deadline is a reactor timer.
- An idle keep-alive connection closes after the Site's `timeout` (`--idle-timeout`).
- One address may hold at most `max_per_peer` connections (0: no cap); the next is closed
  at once. Behind a proxy every connection comes from the proxy: raise the cap there.
- Headers larger than `totalHeadersSize` are refused by twisted.web (431-like close).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

log = Logger()


class GuardedChannel(HTTPChannel):
    header_timeout = 15.0
    body_timeout = 600.0

    def __init__(self) -> None:
        super().__init__()
        self._deadline: IDelayedCall | None = None
        self._in_request = False
        self.peer_host = ""

    def dataReceived(self, data: bytes) -> None:
        if not self._in_request and data.strip():
            self._in_request = True
            self._arm(self.header_timeout, "headers")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._arm(self.body_timeout, "body")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._disarm()
        self._in_request = False
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        factory = getattr(self, "factory", None)
        if factory is not None and hasattr(factory, "release"):
            factory.release(self.peer_host)
        super().connectionLost(reason)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        if seconds > 0:
            self._deadline = self.callLater(seconds, lambda: self._too_slow(what, seconds))

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        log.info(
            "dropped a connection from {peer}: its request {what} took over {seconds:.0f}s",
            peer=self.peer_host,
            what=what,
            seconds=seconds,
        )
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class PeerLimit:
    """Counts connections per address for a Site (mixed in by APISite)."""

    max_per_peer = 256

    def _peers(self) -> Counter[str]:
        peers: Counter[str] | None = getattr(self, "_peer_counts", None)
        if peers is None:
            peers = Counter()
            self._peer_counts: Counter[str] = peers
        return peers

    def admit(self, host: str) -> bool:
        peers = self._peers()
        if self.max_per_peer and peers[host] >= self.max_per_peer:
            return False
        peers[host] += 1
        return True

    def release(self, host: str) -> None:
        peers = self._peers()
        if peers[host] > 1:
            peers[host] -= 1
        else:
            peers.pop(host, None)
