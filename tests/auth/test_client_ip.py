"""Auth.client_ip and parse_networks: forwarded headers count only from trusted proxies.

client_ip is a pure function of the request's peer address and two headers, so a minimal
stand-in request is enough here (the live daemon's use is in test_teams_api)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from pulumid.auth.service import Auth, parse_networks


@dataclass
class FakeRequest:
    peer: Any
    headers: dict[str, str] = field(default_factory=dict)

    def getClientAddress(self) -> Any:
        return self.peer

    def getHeader(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def auth(trusted: str = "") -> Auth:
    # client_ip needs none of the collaborators.
    none: Any = None
    return Auth("jwt", none, none, none, trusted_proxies=parse_networks(trusted))


def ip(peer: str, trusted: str = "", **headers: str) -> str:
    address: Any = IPv6Address("TCP", peer, 1) if ":" in peer else IPv4Address("TCP", peer, 1)
    request = FakeRequest(address, {k.replace("_", "-"): v for k, v in headers.items()})
    return auth(trusted).client_ip(request)


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert ip("192.0.2.7") == "192.0.2.7"
    assert ip("192.0.2.7", x_forwarded_for="203.0.113.9") == "192.0.2.7"
    assert ip("192.0.2.7", x_real_ip="203.0.113.9") == "192.0.2.7"


def test_an_untrusted_peers_headers_are_ignored() -> None:
    trusted = "10.0.0.0/8"
    assert ip("192.0.2.7", trusted, x_forwarded_for="203.0.113.9") == "192.0.2.7"
    assert ip("192.0.2.7", trusted, x_real_ip="203.0.113.9") == "192.0.2.7"
    # Even when the header names a trusted address.
    assert ip("192.0.2.7", trusted, x_forwarded_for="10.1.1.1") == "192.0.2.7"


def test_a_trusted_proxy_rightmost_untrusted_hop_wins() -> None:
    trusted = "10.0.0.0/8, 172.16.0.1"
    assert ip("10.0.0.1", trusted, x_forwarded_for="203.0.113.9") == "203.0.113.9"
    # The client may send a forged XFF; proxies append: the nearest untrusted hop counts.
    forged = "1.2.3.4, 203.0.113.9, 172.16.0.1, 10.2.3.4"
    assert ip("10.0.0.1", trusted, x_forwarded_for=forged) == "203.0.113.9"
    assert ip("10.0.0.1", trusted, x_forwarded_for=" 198.51.100.1 ,, 10.9.9.9 ") == "198.51.100.1"
    # Every hop trusted: the farthest one.
    assert ip("10.0.0.1", trusted, x_forwarded_for="10.5.5.5, 172.16.0.1") == "10.5.5.5"
    # XFF wins over X-Real-IP.
    assert (
        ip("10.0.0.1", trusted, x_forwarded_for="203.0.113.9", x_real_ip="198.51.100.1")
        == "203.0.113.9"
    )


def test_x_real_ip_when_there_is_no_x_forwarded_for() -> None:
    assert ip("10.0.0.1", "10.0.0.0/8", x_real_ip=" 203.0.113.9 ") == "203.0.113.9"
    assert ip("10.0.0.1", "10.0.0.0/8", x_real_ip="2001:db8::1") == "2001:db8::1"
    assert ip("10.0.0.1", "10.0.0.0/8", x_forwarded_for="", x_real_ip="203.0.113.9") == (
        "203.0.113.9"
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x_forwarded_for": "not-an-address"},
        {"x_forwarded_for": "203.0.113.9, <script>"},
        {"x_forwarded_for": "unknown, 10.0.0.2"},
        {"x_forwarded_for": "999.1.1.1"},
        {"x_forwarded_for": " , ,"},
        {"x_real_ip": "garbage"},
        {"x_real_ip": "203.0.113.9:443"},
        {"x_real_ip": ""},
        {},
    ],
)
def test_garbage_falls_back_to_the_peer(headers: dict[str, str]) -> None:
    assert ip("10.0.0.1", "10.0.0.0/8", **headers) == "10.0.0.1"


def test_ipv6_proxies() -> None:
    trusted = "::1/128, fd00::/8"
    assert ip("::1", trusted, x_forwarded_for="2001:db8::5, fd00::2") == "2001:db8::5"
    assert ip("2001:db8::9", trusted, x_forwarded_for="2001:db8::5") == "2001:db8::9"


def test_a_peer_without_a_host() -> None:
    request = FakeRequest(UNIXAddress(b"/tmp/sock"), {"x-forwarded-for": "203.0.113.9"})
    assert auth("10.0.0.0/8").client_ip(request) == ""


def test_parse_networks() -> None:
    assert parse_networks("") == []
    assert parse_networks(" , ") == []
    networks = parse_networks("127.0.0.1, 10.0.0.0/8,::1, 192.168.1.7/24")
    assert [str(n) for n in networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "192.168.1.0/24"]


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "10.0.0", "fe80::/129", "1.2.3.4/x"])
def test_parse_networks_names_the_bad_value(bad: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_networks(f"127.0.0.1/32, {bad} ,::1")
    assert str(caught.value) == f"not an address or CIDR: {bad!r}"
