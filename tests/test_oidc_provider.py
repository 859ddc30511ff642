"""The OIDC test harness itself, against the real oidc-provider: discovery, a code flow with
PKCE through the dev login and consent pages, refresh, disabled accounts, key rotation and
minted tokens."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.oidc_provider import (
    OIDCProvider,
    OIDCProviderError,
    OIDCUser,
    SignInError,
    oidc_provider,
    pkce_pair,
    sign_in,
)

# Nothing listens here: sign_in stops at the redirect and never fetches it.
REDIRECT_URI = "http://127.0.0.1:9/oidc/callback"

USERS = (
    OIDCUser("alice", "alice@example.com", ["platform"], "Alice Example"),
    OIDCUser("bob", "bob@example.com", ["readers"], "Bob Example"),
    OIDCUser("carol", "carol@example.com", ["platform", "readers"], "Carol Example"),
)


@pytest.fixture(scope="module")
def op() -> Iterator[OIDCProvider]:
    with oidc_provider([REDIRECT_URI], users=USERS, id_token_ttl=120) as provider:
        yield provider


def authorize_url(
    op: OIDCProvider, challenge: str, state: str, nonce: str = "n-1", **extra: str
) -> str:
    query = {
        "client_id": op.client_id,
        "response_type": "code",
        "scope": "openid email profile groups offline_access",
        "redirect_uri": REDIRECT_URI,
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return f"{op.authorization_endpoint}?{urllib.parse.urlencode(query)}"


def code_flow(op: OIDCProvider, login: str, **extra: str) -> dict[str, Any]:
    """Sign in as login and exchange the code; the token endpoint's JSON answer."""
    verifier, challenge = pkce_pair()
    redirect = sign_in(authorize_url(op, challenge, state=f"st-{login}", **extra), login)
    assert redirect.startswith(REDIRECT_URI + "?")
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(redirect).query)
    assert params["state"] == [f"st-{login}"]
    assert params["iss"] == [op.issuer]  # RFC 9207, advertised in discovery
    status, tokens = op.token_request(
        {
            "grant_type": "authorization_code",
            "code": params["code"][0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
    )
    assert status == 200, tokens
    return tokens


def verify_id_token(op: OIDCProvider, token: str) -> dict[str, Any]:
    key = jwt.PyJWKClient(op.jwks_url, cache_keys=False).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS256", "ES256"], audience=op.client_id, issuer=op.issuer
    )
    return claims


def refresh(op: OIDCProvider, refresh_token: str) -> tuple[int, dict[str, Any]]:
    # client_secret_post here, basic for the code exchange: the client may use either.
    return op.token_request(
        {"grant_type": "refresh_token", "refresh_token": refresh_token}, auth="post"
    )


def test_discovery(op: OIDCProvider) -> None:
    doc = op.discovery
    assert op.issuer.startswith("http://127.0.0.1:")
    assert doc["issuer"] == op.issuer
    for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        assert doc[endpoint].startswith(op.issuer + "/"), endpoint
    assert op.jwks_url == doc["jwks_uri"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "email", "profile", "groups", "offline_access"} <= set(
        doc["scopes_supported"]
    )
    assert {"client_secret_basic", "client_secret_post"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )
    assert op.version.startswith("9.")
    kinds = {(k["kty"], k["alg"]) for k in op.jwks()["keys"]}
    assert kinds == {("RSA", "RS256"), ("EC", "ES256")}


def test_code_flow_with_pkce_and_refresh(op: OIDCProvider) -> None:
    tokens = code_flow(op, "alice")
    assert tokens["token_type"].lower() == "bearer"
    assert "refresh_token" in tokens, tokens
    claims = verify_id_token(op, tokens["id_token"])
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["platform"]
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["name"] == "Alice Example"
    assert claims["nonce"] == "n-1"
    # id_token_ttl=120 from the fixture.
    assert claims["exp"] - claims["iat"] == 120

    status, renewed = refresh(op, tokens["refresh_token"])
    assert status == 200, renewed
    again = verify_id_token(op, renewed["id_token"])
    assert again["sub"] == "alice" and again["groups"] == ["platform"]


def test_second_user_and_pkce_enforced(op: OIDCProvider) -> None:
    tokens = code_flow(op, "bob")
    assert verify_id_token(op, tokens["id_token"])["groups"] == ["readers"]

    # A wrong code_verifier loses the code.
    _, challenge = pkce_pair()
    redirect = sign_in(authorize_url(op, challenge, state="s"), "bob")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(redirect).query)["code"][0]
    status, answer = op.token_request(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": pkce_pair()[0],
        }
    )
    assert (status, answer["error"]) == (400, "invalid_grant")

    # No code_challenge at all: PKCE is required for this confidential client too.
    query = urllib.parse.urlencode(
        {
            "client_id": op.client_id,
            "response_type": "code",
            "scope": "openid",
            "redirect_uri": REDIRECT_URI,
            "state": "s",
        }
    )
    redirect = sign_in(f"{op.authorization_endpoint}?{query}", "bob")
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(redirect).query)
    assert params["error"] == ["invalid_request"], params


def test_unregistered_redirect_uri_is_refused(op: OIDCProvider) -> None:
    url = authorize_url(op, pkce_pair()[1], state="s").replace(
        urllib.parse.quote(REDIRECT_URI, safe=""),
        urllib.parse.quote("http://127.0.0.1:9/elsewhere", safe=""),
    )
    with pytest.raises(SignInError, match="redirect_uri"):
        sign_in(url, "alice")


def test_disabled_account_cannot_refresh(op: OIDCProvider) -> None:
    tokens = code_flow(op, "carol")
    status, _ = refresh(op, tokens["refresh_token"])
    assert status == 200
    op.disable("carol")
    try:
        status, answer = refresh(op, tokens["refresh_token"])
        assert (status, answer["error"]) == (400, "invalid_grant"), answer
    finally:
        op.enable("carol")


def test_rotate_and_mint(op: OIDCProvider) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "aud": "pulumid", "iat": now, "nbf": now, "exp": now + 60}
    before = jwt.get_unverified_header(op.mint(claims))["kid"]
    published_before = {k["kid"] for k in op.jwks()["keys"]}
    assert before in published_before

    tokens_before = code_flow(op, "alice")
    new_kids = op.rotate()
    after_token = op.mint(claims)
    after = jwt.get_unverified_header(after_token)["kid"]
    assert after != before
    assert after == new_kids[0]
    published = {k["kid"] for k in op.jwks()["keys"]}
    assert {before, after} <= published
    # Minted tokens verify against the published JWKS and default iss to the issuer.
    assert verify_id_token_like(op, after_token)["iss"] == op.issuer

    # The provider's own tokens use the new key too, and sessions and refresh tokens from
    # before the rotation still work.
    status, renewed = refresh(op, tokens_before["refresh_token"])
    assert status == 200, renewed
    assert jwt.get_unverified_header(renewed["id_token"])["kid"] == after
    assert verify_id_token(op, code_flow(op, "bob")["id_token"])["sub"] == "bob"

    es = jwt.get_unverified_header(op.mint(claims, alg="ES256"))
    assert es["alg"] == "ES256" and es["kid"] == new_kids[1]

    op.rotate(drop_old=True)
    remaining = {k["kid"] for k in op.jwks()["keys"]}
    assert before not in remaining and after not in remaining
    assert len(remaining) == 2


def verify_id_token_like(op: OIDCProvider, token: str) -> dict[str, Any]:
    key = jwt.PyJWKClient(op.jwks_url, cache_keys=False).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience="pulumid")
    return claims


def test_mint_foreign_and_forged(op: OIDCProvider) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "aud": "pulumid", "iat": now, "exp": now + 60}
    published = {k["kid"] for k in op.jwks()["keys"]}

    foreign = op.mint(claims, key="foreign")
    assert jwt.get_unverified_header(foreign)["kid"] not in published
    with pytest.raises(jwt.PyJWKClientError):
        jwt.PyJWKClient(op.jwks_url, cache_keys=False).get_signing_key_from_jwt(foreign)

    # A foreign key under a published kid: found in the JWKS, but the signature fails.
    current = op.current_kids()[0]
    forged = op.mint(claims, key="foreign", kid=current)
    key = jwt.PyJWKClient(op.jwks_url, cache_keys=False).get_signing_key_from_jwt(forged)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key, algorithms=["RS256"], audience="pulumid")

    unsigned = op.mint(claims, alg="none")
    assert jwt.get_unverified_header(unsigned)["alg"] == "none"
    assert jwt.decode(unsigned, options={"verify_signature": False})["iss"] == op.issuer


def test_unknown_login(op: OIDCProvider) -> None:
    with pytest.raises(OIDCProviderError, match="404"):
        op.disable("nobody")
    # The dev login page takes any login; findAccount then finds no account, and oidc-provider
    # answers with its error page (server_error), never a redirect to the client.
    with pytest.raises(SignInError, match="server_error"):
        sign_in(authorize_url(op, pkce_pair()[1], state="s"), "nobody")


def test_strict_offline_access() -> None:
    """refresh_tokens="offline_access": oidc-provider's own rule, where offline_access (and so a
    refresh token) survives only when the request also says prompt=consent."""
    with oidc_provider([REDIRECT_URI], refresh_tokens="offline_access") as strict:
        plain = code_flow(strict, "alice")
        assert "offline_access" not in plain["scope"].split()
        assert "refresh_token" not in plain

        consented = code_flow(strict, "alice", prompt="consent")
        assert "offline_access" in consented["scope"].split()
        status, renewed = refresh(strict, consented["refresh_token"])
        assert status == 200, renewed


def test_missing_install_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULUMID_CACHE", str(tmp_path))
    with pytest.raises(OIDCProviderError, match=r"install-oidc-provider\.sh"):
        OIDCProvider().start([REDIRECT_URI])


def test_set_redirect_uris(op: OIDCProvider) -> None:
    other = "http://127.0.0.1:10/elsewhere/callback"
    op.set_redirect_uris([REDIRECT_URI, other])
    try:
        url = authorize_url(op, pkce_pair()[1], state="s").replace(
            urllib.parse.quote(REDIRECT_URI, safe=""), urllib.parse.quote(other, safe="")
        )
        redirect = sign_in(url, "alice")
        assert redirect.startswith(other + "?code="), redirect
    finally:
        op.set_redirect_uris([REDIRECT_URI])
