"""What the API needs from authentication and authorization, bundled once in tap.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pulumid.auth.access import Access
from pulumid.auth.authn import Authenticator
from pulumid.ops.audit import AuditTrail

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Auth:
    mode: str
    authenticator: Authenticator
    access: Access
    audit: AuditTrail
    trusted_proxies: Sequence[Network] = ()
    # Set in the modes that have them: pulumid.auth.people.People (oidc, google) and
    # pulumid.auth.exchange.TokenExchange.
    people: Any = None
    exchange: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_user(self) -> bool:
        return self.mode != "single-tenant"

    def client_ip(self, request: Any) -> str:
        """The peer's address; forwarded headers count only from a trusted proxy."""
        peer = getattr(request.getClientAddress(), "host", "") or ""
        if not self.trusted_proxies or not _within(peer, self.trusted_proxies):
            return str(peer)
        forwarded = request.getHeader("x-forwarded-for")
        if forwarded:
            # Walk from the nearest hop: the first address not of a trusted proxy is the client.
            hops = [h.strip() for h in forwarded.split(",") if h.strip()]
            for hop in reversed(hops):
                if not _within(hop, self.trusted_proxies):
                    return hop if _parses(hop) else str(peer)
            return hops[0] if hops and _parses(hops[0]) else str(peer)
        real = (request.getHeader("x-real-ip") or "").strip()
        return real if _parses(real) else str(peer)


def parse_networks(text: str) -> list[Network]:
    """Comma-separated CIDRs (or plain addresses); ValueError names the bad one."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not an address or CIDR: {part!r}") from None
    return networks


def _parses(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
