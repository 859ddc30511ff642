"""Fixtures for the auth tests: the real OpenID Connect provider (tests/oidc_provider.py),
one per test module (key rotation in one module must not surprise another)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.oidc_provider import OIDCProvider, OIDCUser, oidc_provider

# Nothing listens here: these tests mint tokens and never run a browser sign-in.
REDIRECT_URI = "http://127.0.0.1:9/oidc/callback"

USERS = (
    OIDCUser("alice", "alice@example.com", ["platform"], "Alice Example"),
    OIDCUser("bob", "bob@example.com", ["readers"], "Bob Example"),
)


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    with oidc_provider([REDIRECT_URI], users=USERS) as op:
        yield op
