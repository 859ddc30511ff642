"""JWTVerifier (pulumid.auth.jwt): fixed keys (an HMAC secret, a PEM public key) and a JWKS
served by the real OpenID Connect provider (tests/oidc_provider.py), fetched with the
daemon's own fetcher (treq); times are checked against a fake clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock

from pulumid.auth.jwt import (
    Fetch,
    InvalidToken,
    JWKSKeys,
    JWTVerifier,
    StaticKey,
    claim_strings,
    principal_of,
    unverified_claims,
)
from pulumid.auth.outbound import fetch_json
from pulumid.errors import Unauthorized
from tests.oidc_provider import OIDCProvider

NOW = 1_700_000_000
# 64 bytes: pyjwt warns (an error under pytest) about HS512 keys shorter than that.
SECRET = "a-shared-secret-long-enough-for-hs512-".ljust(64, "x")
AUDIENCE = "pulumid"


def clock_at(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "aud": AUDIENCE, "iat": NOW, "exp": NOW + 300, **extra}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], body: dict[str, Any], key: bytes | None = None) -> str:
    """A JWT built by hand (pyjwt refuses to make some of the bad ones): HS256 with KEY, or
    unsigned."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned(body: dict[str, Any]) -> str:
    return handmade({"alg": "none", "typ": "JWT"}, body)


async def refused(verifier: JWTVerifier, token: str, why: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    message = caught.value.message
    assert isinstance(caught.value, Unauthorized) and caught.value.status == 401
    assert message.startswith("Unauthorized: "), message
    assert why in message, message
    return message


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# -- an HMAC secret -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hmac_secret() -> None:
    verifier = JWTVerifier(StaticKey.secret(SECRET), clock_at(), audience=AUDIENCE)
    for alg in ("HS256", "HS384", "HS512"):
        token = jwt.encode(claims(), SECRET, algorithm=alg)
        assert (await verifier.verify(token))["sub"] == "alice"
    wrong = jwt.encode(claims(), SECRET + "x", algorithm="HS256")
    await refused(verifier, wrong, "signature does not verify")
    await refused(verifier, unsigned(claims()), "tokens signed with 'none' are not accepted")
    # An RS256 token is refused before any key is tried: a secret only checks HMACs.
    rs256 = jwt.encode(claims(), rsa_key(), algorithm="RS256")
    await refused(verifier, rs256, "tokens signed with 'RS256' are not accepted")
    # A header that says HS256 over a body signed otherwise.
    tampered = ".".join([*jwt.encode(claims(), SECRET, algorithm="HS256").split(".")[:2], "x"])
    await refused(verifier, tampered, "Unauthorized:")


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "eyJ.eyJ.x", "not a jwt at all", "..."],
)
@pytest_twisted.ensureDeferred
async def test_malformed_tokens(token: str) -> None:
    verifier = JWTVerifier(StaticKey.secret(SECRET), clock_at())
    await refused(verifier, token, "Unauthorized:")


# -- a PEM public key -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pem_public_key_rs256_and_ps256() -> None:
    key = rsa_key()
    verifier = JWTVerifier(StaticKey.public(public_pem(key)), clock_at(), audience=AUDIENCE)
    for alg in ("RS256", "RS512", "PS256"):
        assert (await verifier.verify(jwt.encode(claims(), key, algorithm=alg)))["sub"] == "alice"
    other = jwt.encode(claims(), rsa_key(), algorithm="RS256")
    await refused(verifier, other, "signature does not verify")


@pytest_twisted.ensureDeferred
async def test_pem_public_key_es256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    verifier = JWTVerifier(StaticKey.public(public_pem(key)), clock_at(), audience=AUDIENCE)
    token = jwt.encode(claims(sub="bob"), key, algorithm="ES256")
    assert (await verifier.verify(token))["sub"] == "bob"
    other = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    await refused(verifier, other, "signature does not verify")


@pytest_twisted.ensureDeferred
async def test_pem_public_key_refuses_algorithm_confusion() -> None:
    key = rsa_key()
    pem = public_pem(key)
    verifier = JWTVerifier(StaticKey.public(pem), clock_at())
    # The classic attack: an HMAC keyed with the (public) PEM text.
    confused = handmade({"alg": "HS256", "typ": "JWT"}, claims(), pem.encode())
    await refused(verifier, confused, "tokens signed with 'HS256' are not accepted")
    await refused(verifier, unsigned(claims()), "tokens signed with 'none' are not accepted")
    # An EC token against an RSA key: refused as a 401, not a crash.
    ec_token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    await refused(verifier, ec_token, "Unauthorized:")


# -- times, issuer, audience (a fixed key) --------------------------------------------------


def hmac_verifier(clock: Clock, **options: Any) -> JWTVerifier:
    return JWTVerifier(StaticKey.secret(SECRET), clock, **options)


def hs(**extra: Any) -> str:
    body = claims(**extra)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, "HS256")


@pytest_twisted.ensureDeferred
async def test_times_follow_the_clock() -> None:
    clock = clock_at()
    verifier = hmac_verifier(clock, leeway=30)
    token = hs(exp=NOW + 60)
    await verifier.verify(token)
    clock.advance(60 + 30)  # exp + leeway: still fine
    await verifier.verify(token)
    clock.advance(1)
    await refused(verifier, token, "the token has expired")
    await refused(hmac_verifier(clock_at()), hs(exp=NOW - 31), "the token has expired")
    await hmac_verifier(clock_at()).verify(hs(exp=NOW - 29))  # within leeway
    await refused(hmac_verifier(clock_at()), hs(nbf=NOW + 31), "the token is not valid yet")
    await hmac_verifier(clock_at()).verify(hs(nbf=NOW + 29))
    await refused(hmac_verifier(clock_at()), hs(iat=NOW + 31), "issued in the future")
    await refused(hmac_verifier(clock_at(), leeway=0), hs(exp=NOW - 1), "expired")


@pytest_twisted.ensureDeferred
async def test_required_and_typed_claims() -> None:
    verifier = hmac_verifier(clock_at())
    await refused(verifier, hs(exp=None), "the token has no 'exp' claim")
    await refused(verifier, hs(exp="tomorrow"), "the token's 'exp' claim is not a number")
    await refused(verifier, hs(exp=True), "the token's 'exp' claim is not a number")
    await refused(verifier, hs(nbf="soon"), "the token's 'nbf' claim is not a number")


@pytest_twisted.ensureDeferred
async def test_issuer_and_audience() -> None:
    verifier = hmac_verifier(clock_at(), issuer="https://idp", audience=AUDIENCE)
    await verifier.verify(hs(iss="https://idp"))
    await verifier.verify(hs(iss="https://idp", aud=["other", AUDIENCE]))
    await refused(verifier, hs(iss="https://evil"), "issuer 'https://evil' is not trusted")
    await refused(verifier, hs(), "issuer None is not trusted")
    await refused(verifier, hs(iss="https://idp", aud="other"), "not meant for this audience")
    await refused(verifier, hs(iss="https://idp", aud=["a", "b"]), "not meant for this audience")
    await refused(verifier, hs(iss="https://idp", aud=None), "not meant for this audience")
    # Neither configured: any issuer and audience.
    await hmac_verifier(clock_at()).verify(hs(iss="https://anyone", aud="anything"))


@pytest_twisted.ensureDeferred
async def test_nonce() -> None:
    verifier = hmac_verifier(clock_at())
    assert (await verifier.verify(hs(nonce="n-1"), nonce="n-1"))["nonce"] == "n-1"
    with pytest.raises(InvalidToken, match="nonce does not match"):
        await verifier.verify(hs(nonce="n-1"), nonce="n-2")
    with pytest.raises(InvalidToken, match="nonce does not match"):
        await verifier.verify(hs(), nonce="n-1")


# -- a JWKS from the real provider ----------------------------------------------------------


class CountingFetch:
    """The daemon's fetcher (treq), counting the fetches."""

    def __init__(self, fetch: Fetch = fetch_json) -> None:
        self.urls: list[str] = []
        self._fetch = fetch

    async def __call__(self, url: str) -> Any:
        self.urls.append(url)
        return await self._fetch(url)

    @property
    def count(self) -> int:
        return len(self.urls)


def jwks_verifier(
    provider: OIDCProvider, clock: Clock, fetch: Callable[[str], Awaitable[Any]]
) -> JWTVerifier:
    keys = JWKSKeys(provider.jwks_url, fetch, clock)
    return JWTVerifier(keys, clock, issuer=provider.issuer, audience=AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_jwks_valid_tokens(provider: OIDCProvider) -> None:
    fetch = CountingFetch()
    verifier = jwks_verifier(provider, clock_at(), fetch)
    rs256 = provider.mint(claims(email="alice@example.com"))
    es256 = provider.mint(claims(sub="bob"), alg="ES256")
    got = await verifier.verify(rs256)
    assert got["sub"] == "alice" and got["iss"] == provider.issuer
    assert (await verifier.verify(es256))["sub"] == "bob"
    assert fetch.urls == [provider.jwks_url]  # one fetch serves both


@pytest_twisted.ensureDeferred
async def test_jwks_times_issuer_audience(provider: OIDCProvider) -> None:
    verifier = jwks_verifier(provider, clock_at(), CountingFetch())
    expired = provider.mint(claims(exp=NOW - 31))
    in_leeway = provider.mint(claims(exp=NOW - 29))
    early = provider.mint(claims(nbf=NOW + 60))
    wrong_audience = provider.mint(claims(aud="someone-else"))
    wrong_issuer = provider.mint({**claims(), "iss": "http://evil.example"})
    no_exp = provider.mint({k: v for k, v in claims().items() if k != "exp"})
    await refused(verifier, expired, "expired")
    await verifier.verify(in_leeway)
    await refused(verifier, early, "not valid yet")
    await refused(verifier, wrong_audience, "not meant for this audience")
    await refused(verifier, wrong_issuer, "issuer 'http://evil.example' is not trusted")
    await refused(verifier, no_exp, "no 'exp' claim")


@pytest_twisted.ensureDeferred
async def test_jwks_refuses_foreign_keys_none_and_hmac(provider: OIDCProvider) -> None:
    fetch = CountingFetch()
    clock = clock_at()
    verifier = jwks_verifier(provider, clock, fetch)
    foreign = provider.mint(claims(), key="foreign")
    foreign_ec = provider.mint(claims(), key="foreign", alg="ES256")
    # A foreign key under a published kid: the kid is found, the signature fails.
    published = provider.current_kids()[0]
    impostor = provider.mint(claims(), key="foreign", kid=published)
    none = provider.mint(claims(), alg="none")
    # HMAC keyed with something public: never accepted from a JWKS.
    hs256 = provider.mint(claims(), alg="HS256", secret="whatever", kid=published)
    await refused(verifier, foreign, "is not one of the issuer's keys")
    await refused(verifier, foreign_ec, "is not one of the issuer's keys")
    await refused(verifier, impostor, "signature does not verify")
    await refused(verifier, none, "tokens signed with 'none' are not accepted")
    await refused(verifier, hs256, "tokens signed with 'HS256' are not accepted")
    assert fetch.count == 1  # unknown kids within MIN_REFETCH: no refetch


@pytest_twisted.ensureDeferred
async def test_jwks_rotation_refetches_on_an_unknown_kid(provider: OIDCProvider) -> None:
    fetch = CountingFetch()
    clock = clock_at()
    verifier = jwks_verifier(provider, clock, fetch)
    old = provider.mint(claims())
    await verifier.verify(old)
    assert fetch.count == 1
    new_kids = provider.rotate()
    new = provider.mint(claims())
    assert jwt.get_unverified_header(new)["kid"] == new_kids[0]
    # Just fetched: an unknown kid does not refetch yet.
    await refused(verifier, new, "is not one of the issuer's keys")
    assert fetch.count == 1
    clock.advance(JWKSKeys.MIN_REFETCH)
    assert (await verifier.verify(new))["sub"] == "alice"
    assert fetch.count == 2
    await verifier.verify(old)  # the old key is still published
    # A second unknown kid within MIN_REFETCH of that refetch: refused without a fetch.
    clock.advance(JWKSKeys.MIN_REFETCH / 2)
    foreign = provider.mint(claims(), key="foreign")
    await refused(verifier, foreign, "is not one of the issuer's keys")
    assert fetch.count == 2
    # Later it may look again (and still not find it).
    clock.advance(JWKSKeys.MIN_REFETCH / 2)
    await refused(verifier, foreign, "is not one of the issuer's keys")
    assert fetch.count == 3
    # Known kids never refetch.
    await verifier.verify(new)
    assert fetch.count == 3


@pytest_twisted.ensureDeferred
async def test_jwks_retired_keys_stop_working_after_max_age(provider: OIDCProvider) -> None:
    fetch = CountingFetch()
    clock = clock_at()
    verifier = jwks_verifier(provider, clock, fetch)
    old = provider.mint(claims(exp=NOW + 7200))
    await verifier.verify(old)
    provider.rotate(drop_old=True)
    new = provider.mint(claims(exp=NOW + 7200))
    clock.advance(JWKSKeys.MAX_AGE / 2)
    await verifier.verify(old)  # still cached
    await verifier.verify(new)  # unknown kid: refetched
    assert fetch.count == 2
    clock.advance(JWKSKeys.MAX_AGE + 1)
    await verifier.verify(new)  # the set is refreshed anyway
    assert fetch.count == 3
    await refused(verifier, old, "is not one of the issuer's keys")


# -- JWKS fetching failures (a fake fetch) --------------------------------------------------


def jwk_of(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    entry |= {"alg": "RS256", **extra}
    if kid is not None:
        entry["kid"] = kid
    return entry


class FakeJWKS:
    def __init__(self, *keys: dict[str, Any]) -> None:
        self.document: Any = {"keys": list(keys)}
        self.error: Exception | None = None
        self.count = 0

    async def __call__(self, url: str) -> Any:
        self.count += 1
        if self.error is not None:
            raise self.error
        return self.document


def fake_verifier(jwks: FakeJWKS, clock: Clock) -> JWTVerifier:
    return JWTVerifier(JWKSKeys("https://idp/jwks", jwks, clock), clock)


@pytest_twisted.ensureDeferred
async def test_jwks_that_cannot_be_fetched() -> None:
    key = rsa_key()
    jwks = FakeJWKS(jwk_of(key, "k1"))
    jwks.error = OSError("GET https://idp/jwks: HTTP 503")
    clock = clock_at()
    verifier = fake_verifier(jwks, clock)
    token = jwt.encode(claims(exp=NOW + 86400), key, "RS256", headers={"kid": "k1"})
    await refused(verifier, token, "the issuer's signing keys cannot be fetched")
    jwks.error = None
    # The failed fetch counts: the next one waits MIN_REFETCH (a dead JWKS is not hammered).
    await refused(verifier, token, "the issuer's signing keys cannot be fetched")
    clock.advance(JWKSKeys.MIN_REFETCH)
    await verifier.verify(token)
    # A failure later keeps the keys we had.
    jwks.error = ValueError("not JSON")
    clock.advance(JWKSKeys.MAX_AGE + 1)
    await verifier.verify(token)
    jwks.document = ["not", "a", "mapping"]
    jwks.error = None
    clock.advance(JWKSKeys.MAX_AGE + 1)
    await verifier.verify(token)


@pytest_twisted.ensureDeferred
async def test_a_failing_jwks_is_not_fetched_on_every_request() -> None:
    """JWKSKeys promises at most one refetch per MIN_REFETCH, so forged kids cannot make us
    hammer the provider; that should hold while the provider is failing too (each fetch can
    also hold a request for the fetch timeout)."""
    key = rsa_key()
    jwks = FakeJWKS(jwk_of(key, "k1"))
    clock = clock_at()
    verifier = fake_verifier(jwks, clock)
    token = jwt.encode(claims(exp=NOW + 86400), key, "RS256", headers={"kid": "k1"})
    await verifier.verify(token)
    clock.advance(JWKSKeys.MAX_AGE + 1)
    jwks.error = OSError("GET https://idp/jwks: HTTP 503")
    await verifier.verify(token)  # the refresh fails; the keys we had still verify
    assert jwks.count == 2
    forged = jwt.encode(claims(exp=NOW + 86400), rsa_key(), "RS256", headers={"kid": "forged"})
    for _ in range(3):
        await refused(verifier, forged, "is not one of the issuer's keys")
        await verifier.verify(token)
    assert jwks.count == 2, f"{jwks.count - 2} more fetches within MIN_REFETCH"


@pytest_twisted.ensureDeferred
async def test_jwks_entries_and_tokens_without_kid() -> None:
    signer, other = rsa_key(), rsa_key()
    jwks = FakeJWKS(
        jwk_of(signer, None),
        jwk_of(other, "enc-key", use="enc"),  # not for signatures: skipped
        {"kty": "OKP", "crv": "X448", "x": "AAAA", "kid": "odd"},  # unusable: skipped
    )
    verifier = fake_verifier(jwks, clock_at())
    # One RS256 signing key and no kid: that key.
    assert (await verifier.verify(jwt.encode(claims(), signer, "RS256")))["sub"] == "alice"
    enc = jwt.encode(claims(), other, "RS256", headers={"kid": "enc-key"})
    await refused(verifier, enc, "is not one of the issuer's keys")
    # Two RS256 keys and no kid: ambiguous, refused.
    two = FakeJWKS(jwk_of(signer, "a"), jwk_of(other, "b"))
    await refused(
        fake_verifier(two, clock_at()),
        jwt.encode(claims(), signer, "RS256"),
        "is not one of the issuer's keys",
    )


@pytest_twisted.ensureDeferred
async def test_jwks_url_from_a_callable() -> None:
    key = rsa_key()
    jwks = FakeJWKS(jwk_of(key, "k1"))
    looked_up: list[str] = []

    async def discover() -> str:
        looked_up.append("discovery")
        return "https://idp/keys"

    clock = clock_at()
    verifier = JWTVerifier(JWKSKeys(discover, jwks, clock), clock)
    await verifier.verify(jwt.encode(claims(), key, "RS256", headers={"kid": "k1"}))
    assert looked_up == ["discovery"] and jwks.count == 1


# -- helpers --------------------------------------------------------------------------------


def test_unverified_claims_and_claim_strings() -> None:
    token = jwt.encode({"sub": "x", "iss": "i"}, SECRET, "HS256")
    assert unverified_claims(token) == {"sub": "x", "iss": "i"}
    for bad in ("", "a.b.c", "x"):
        with pytest.raises(InvalidToken, match="not a well-formed JWT"):
            unverified_claims(bad)
    assert claim_strings("a b,c ,, d") == ("a", "b", "c", "d")
    assert claim_strings(["a", 7, None, "", {"x": 1}, True]) == ("a", "7", "True")
    assert claim_strings(None) == ()
    assert claim_strings({"a": 1}) == ()


def test_principal_of() -> None:
    p = principal_of(
        {"sub": "u1", "email": "Alice@example.com", "name": "Alice", "groups": ["g1"], "exp": 5},
        "email",
        "groups",
    )
    assert (p.kind, p.login, p.name, p.email, p.groups, p.expires) == (
        "user",
        "Alice@example.com",
        "Alice",
        "Alice@example.com",
        frozenset({"g1"}),
        5.0,
    )
    fallback = principal_of({"sub": " u2 ", "roles": "a b"}, "email", "roles")
    assert (fallback.login, fallback.name, fallback.groups) == ("u2", "u2", frozenset({"a", "b"}))
    for nobody in ({}, {"sub": "  "}, {"email": 7}):
        with pytest.raises(InvalidToken, match="names nobody"):
            principal_of(nobody, "email", "groups")
