"""Who an ID token names, and who may sign in: OIDCClient.identity (pure rules)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from pulumid.auth.oidc import OIDCClient, Sealer, SignInRefused
from pulumid.config import AuthConfig
from pulumid.secrets import crypto


def client(**settings: Any) -> OIDCClient:
    config = AuthConfig(
        mode=settings.pop("mode", "oidc"),
        oidc_issuer="https://idp.example.com",
        oidc_client_id="pulumid",
        oidc_client_secret="secret",
        public_url="https://pulumi.example.com",
        **settings,
    )

    async def unused(*args: Any) -> Any:
        raise AssertionError("no network here")

    return OIDCClient(config, Clock(), unused, unused, Sealer(crypto.new_data_key(), b"t"))


def test_login_email_and_groups_come_from_the_configured_claims() -> None:
    oidc = client(username_claim="preferred_username", groups_claim="roles")
    claims = {
        "sub": "u1",
        "preferred_username": "ann",
        "email": "ann@example.com",
        "name": "Ann",
        "roles": ["ops", "dev", "ops"],
    }
    assert oidc.identity(claims) == ("ann", "Ann", "ann@example.com", ("dev", "ops"))
    # Without the username claim, the subject names the person.
    assert oidc.identity({"sub": "u1"})[0] == "u1"


def test_allowed_domains_and_unverified_emails() -> None:
    oidc = client(oidc_allowed_domains="example.com, Example.org")
    assert oidc.identity({"sub": "a", "email": "a@EXAMPLE.ORG"})[0] == "a@EXAMPLE.ORG"
    with pytest.raises(SignInRefused, match="not in an allowed domain"):
        oidc.identity({"sub": "b", "email": "b@evil.com"})
    with pytest.raises(SignInRefused, match="not in an allowed domain"):
        oidc.identity({"sub": "c"})
    with pytest.raises(SignInRefused, match="has not verified"):
        oidc.identity({"sub": "d", "email": "d@example.com", "email_verified": False})


def test_sign_in_state_is_sealed_and_tamper_evident() -> None:
    sealer = Sealer(crypto.new_data_key(), b"pulumid sign-in")
    text = sealer.seal({"p": 8080, "cn": "nonce"})
    assert sealer.open(text) == {"p": 8080, "cn": "nonce"}
    assert "8080" not in text and "nonce" not in text
    forged = text[:-2] + ("AA" if text[-2:] != "AA" else "BB")
    with pytest.raises(Exception, match="sign-in state is not valid"):
        sealer.open(forged)
    with pytest.raises(Exception, match="sign-in state is not valid"):
        Sealer(crypto.new_data_key(), b"pulumid sign-in").open(text)
