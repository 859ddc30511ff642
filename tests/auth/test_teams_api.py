"""Teams over HTTP: the in-process daemon (tests/api/test_api.py `serve`) in jwt mode, its JWTs
verified against the real OpenID Connect provider's JWKS (tests/oidc_provider.py), with an
RBAC file: who sees and may change which stacks, personal tokens, the RFC 8693 token exchange,
the audit log, the organization views, client addresses; and single-tenant mode unchanged."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pulumid.config import AuthConfig
from pulumid.storage.records import AuditRecord
from tests.api.test_api import TOKEN, Reply, Server, serve
from tests.oidc_provider import OIDCProvider

pytestmark = pytest.mark.live

AUDIENCE = "pulumid"
CI_AUDIENCE = "pulumid-ci"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
ORG_TOKEN = "urn:pulumi:token-type:access_token:organization"
TEAM_TOKEN = "urn:pulumi:token-type:access_token:team"
PERSONAL_TOKEN = "urn:pulumi:token-type:access_token:personal"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CI_SUBJECT = "repo:acme/web:ref:refs/heads/main"

ALICE = "alice@example.com"  # group platform: acme admin
BOB = "bob@example.com"  # group readers: acme read, none on acme/*/prod
CAROL = "carol@example.com"  # acme write (by name)
DAVE = "dave@example.com"  # other admin, nothing in acme
ROOT = "root@example.com"  # site admin
EVE = "eve@example.com"  # nobody
GROUPS = {ALICE: ["platform"], BOB: ["readers"], CAROL: [], DAVE: [], ROOT: [], EVE: []}


def rbac(provider: OIDCProvider, issuers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "organizations": {
            "acme": {
                "users": {CAROL: "write"},
                "groups": {"platform": "admin", "readers": "read"},
                "stacks": [{"match": "acme/*/prod", "groups": {"readers": "none"}}],
            },
            "other": {"users": {DAVE: "admin"}},
        },
        "admins": {"users": [ROOT]},
        "token_exchange": [
            {
                "issuer": provider.issuer,
                "audience": CI_AUDIENCE,
                "rules": [
                    {
                        "organization": "acme",
                        "subject": "repo:acme/*",
                        "role": "write",
                        "max_lifetime": 600,
                    }
                ],
            },
            *issuers,
        ],
    }


@asynccontextmanager
async def jwt_daemon(
    tmp_path: Path,
    provider: OIDCProvider,
    issuers: list[dict[str, Any]] | None = None,
    **settings: Any,
) -> AsyncIterator[Server]:
    path = tmp_path / "rbac.yaml"
    path.write_text(yaml.safe_dump(rbac(provider, issuers or [])))
    auth = AuthConfig(
        mode="jwt",
        rbac_config=str(path),
        jwt_jwks_url=provider.jwks_url,
        jwt_issuer=provider.issuer,
        jwt_audience=AUDIENCE,
        **settings,
    )
    async with serve(tmp_path, token="", auth=auth) as server:
        yield server


@pytest.fixture(scope="module")
def jwts(provider: OIDCProvider) -> dict[str, str]:
    """`Bearer <jwt>` for each person, as the provider would issue them."""
    now = int(time.time())
    return {
        login: "Bearer "
        + provider.mint(
            {
                "sub": login.split("@")[0],
                "email": login,
                "name": login.split("@")[0].title(),
                "groups": groups,
                "aud": AUDIENCE,
                "iat": now,
                "exp": now + 3600,
            }
        )
        for login, groups in GROUPS.items()
    }


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def forbidden(reply: Reply, *parts: str) -> str:
    message = reply.assert_error(403)
    assert message.startswith("Forbidden: "), message
    for part in parts:
        assert part in message, message
    return message


async def create(server: Server, who: str, org: str, project: str, name: str) -> Reply:
    return await server.call("POST", f"/api/stacks/{org}/{project}", {"stackName": name}, auth=who)


def stack_ids(body: Mapping[str, Any]) -> set[str]:
    return {s["id"] for s in body["stacks"]}


# -- who am I -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_user_and_organizations(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    expected = {
        ALICE: ["acme"],
        BOB: ["acme"],
        CAROL: ["acme"],
        DAVE: ["other"],
        ROOT: ["acme", "other"],
        EVE: [],
    }
    async with jwt_daemon(tmp_path, provider) as server:
        for login, orgs in expected.items():
            user = await server.ok("GET", "/api/user", auth=jwts[login])
            assert user["githubLogin"] == login
            assert user["email"] == login
            assert user["name"] == login.split("@")[0].title()
            assert [o["githubLogin"] for o in user["organizations"]] == orgs
            assert user["siteAdmin"] is (login == ROOT)
            assert "tokenInfo" not in user
            if orgs:
                default = await server.ok(
                    "GET", "/api/user/organizations/default", auth=jwts[login]
                )
                assert default == {"GitHubLogin": orgs[0], "Messages": []}
        reply = await server.call("GET", "/api/user/organizations/default", auth=jwts[EVE])
        assert reply.json()["code"] == 404
        reply.assert_error(404)
        # The CLI's own scheme carries a JWT as well.
        as_token = "token " + jwts[ALICE].removeprefix("Bearer ")
        assert (await server.ok("GET", "/api/user", auth=as_token))["githubLogin"] == ALICE
        # No shared token in the multi-user modes, and JWTs are checked.
        (await server.call("GET", "/api/user", auth=f"token {TOKEN}")).assert_error(401)
        (await server.call("GET", "/api/user", auth=None)).assert_error(401)
        foreign = provider.mint(
            {"sub": "x", "email": ROOT, "aud": AUDIENCE, "exp": int(time.time()) + 60},
            key="foreign",
        )
        (await server.call("GET", "/api/user", auth=f"Bearer {foreign}")).assert_error(401)
        stale = provider.mint({"sub": "x", "email": ROOT, "aud": AUDIENCE, "exp": 1000})
        message = (await server.call("GET", "/api/user", auth=f"Bearer {stale}")).assert_error(401)
        assert "expired" in message


# -- RBAC on the stack routes ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_roles_on_stack_routes(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    alice, bob, carol, dave = jwts[ALICE], jwts[BOB], jwts[CAROL], jwts[DAVE]
    dev, prod = "/api/stacks/acme/web/dev", "/api/stacks/acme/web/prod"
    async with jwt_daemon(tmp_path, provider) as server:
        for name in ("dev", "prod"):
            assert (await create(server, alice, "acme", "web", name)).code == 200
        assert (await create(server, dave, "other", "svc", "dev")).code == 200

        # A reader reads...
        assert (await server.ok("GET", dev, auth=bob))["stackName"] == "dev"
        export = await server.ok("GET", f"{dev}/export", auth=bob)
        assert export["version"] == 3
        assert (await server.ok("GET", f"{dev}/updates", auth=bob)) is not None
        # ...but changes nothing, and sees nothing of prod.
        forbidden(
            await create(server, bob, "acme", "web", "mine"),
            f"{BOB} has the read role on organization acme; this needs write",
        )
        forbidden(
            await server.call("PATCH", f"{dev}/tags", {"team": "x"}, auth=bob),
            f"{BOB} has the read role on stack acme/web/dev; this needs write",
        )
        forbidden(
            await server.call("DELETE", dev, auth=bob),
            f"{BOB} has the read role on stack acme/web/dev; this needs admin",
        )
        forbidden(
            await server.call("GET", prod, auth=bob),
            f"{BOB} has the none role on stack acme/web/prod; this needs read",
        )
        forbidden(await server.call("GET", f"{prod}/export", auth=bob), "none role")

        # A writer creates and tags but does not delete.
        assert (await create(server, carol, "acme", "web", "carol")).code == 200
        reply = await server.call("PATCH", f"{dev}/tags", {"team": "web"}, auth=carol)
        assert reply.code == 204, reply.body
        assert (await server.ok("GET", dev, auth=bob))["tags"]["team"] == "web"
        forbidden(
            await server.call("DELETE", "/api/stacks/acme/web/carol", auth=carol),
            f"{CAROL} has the write role on stack acme/web/carol; this needs admin",
        )
        forbidden(
            await server.call("POST", f"{dev}/rename", {"newName": "x"}, auth=carol),
            "this needs admin",
        )
        assert (await server.ok("GET", prod, auth=carol))["stackName"] == "prod"
        forbidden(
            await create(server, carol, "other", "svc", "x"),
            f"{CAROL} has the none role on organization other; this needs write",
        )
        # Nobody outside the organization reads in it.
        forbidden(await server.call("GET", dev, auth=dave), "none role on stack acme/web/dev")
        forbidden(await server.call("GET", dev, auth=jwts[EVE]), "none role")

        # The admin deletes.
        reply = await server.call("DELETE", "/api/stacks/acme/web/carol", auth=alice)
        assert reply.code == 204, reply.body
        # A site admin may do anything anywhere.
        reply = await server.call("DELETE", "/api/stacks/other/svc/dev", auth=jwts[ROOT])
        assert reply.code == 204, reply.body
        assert (await create(server, dave, "other", "svc", "dev")).code == 200

        # The stack list shows only what each may read.
        every = {"acme/web/dev", "acme/web/prod", "other/svc/dev"}
        lists = {
            login: stack_ids(await server.ok("GET", "/api/user/stacks", auth=jwts[login]))
            for login in GROUPS
        }
        assert lists == {
            ALICE: {"acme/web/dev", "acme/web/prod"},
            BOB: {"acme/web/dev"},
            CAROL: {"acme/web/dev", "acme/web/prod"},
            DAVE: {"other/svc/dev"},
            ROOT: every,
            EVE: set(),
        }
        other_only = await server.ok("GET", "/api/user/stacks?organization=acme", auth=dave)
        assert other_only["stacks"] == []


# -- personal tokens ------------------------------------------------------------------------


async def new_token(server: Server, who: str, description: str, expires: int = 0) -> Any:
    body = {"description": description, "expires": expires}
    return await server.ok("POST", "/api/user/tokens", body, auth=who)


@pytest_twisted.ensureDeferred
async def test_personal_tokens(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        created = await new_token(server, jwts[ALICE], "laptop")
        assert set(created) == {"id", "tokenValue"}
        token = f"token {created['tokenValue']}"
        # It acts as alice, with the groups her JWT had when she made it.
        user = await server.ok("GET", "/api/user", auth=token)
        assert user["githubLogin"] == ALICE
        assert [o["githubLogin"] for o in user["organizations"]] == ["acme"]
        assert (await create(server, token, "acme", "web", "dev")).code == 200
        reply = await server.call("DELETE", "/api/stacks/acme/web/dev", auth=token)
        assert reply.code == 204, reply.body  # admin through the platform group

        listed = (await server.ok("GET", "/api/user/tokens", auth=jwts[ALICE]))["tokens"]
        assert len(listed) == 1
        (entry,) = listed
        assert entry["id"] == created["id"]
        assert (entry["name"], entry["description"], entry["createdBy"]) == (
            "laptop",
            "laptop",
            ALICE,
        )
        assert (entry["expires"], entry["kind"], entry["admin"]) == (0, "personal", False)
        assert entry["created"].endswith("Z")
        assert entry["lastUsed"] == 0  # not written until the authenticator flushes
        await server.backend.auth.authenticator.flush_last_used()
        (entry,) = (await server.ok("GET", "/api/user/tokens", auth=token))["tokens"]
        assert entry["lastUsed"] > 0
        assert abs(entry["lastUsed"] - time.time()) < 60

        # Others see none of it and cannot revoke it.
        assert (await server.ok("GET", "/api/user/tokens", auth=jwts[CAROL]))["tokens"] == []
        reply = await server.call("DELETE", f"/api/user/tokens/{created['id']}", auth=jwts[CAROL])
        reply.assert_error(404)
        assert (await server.call("GET", "/api/user", auth=token)).code == 200

        # The owner revokes it: it stops working at once.
        reply = await server.call("DELETE", f"/api/user/tokens/{created['id']}", auth=token)
        assert reply.code == 204, reply.body
        (await server.call("GET", "/api/user", auth=token)).assert_error(401)
        assert (await server.ok("GET", "/api/user/tokens", auth=jwts[ALICE]))["tokens"] == []
        reply = await server.call("DELETE", f"/api/user/tokens/{created['id']}", auth=jwts[ALICE])
        reply.assert_error(404)

        # Bad bodies.
        for body in (
            {"description": 7},
            {"description": "x" * 1025},
            {"expires": -1},
            {"expires": "soon"},
            {"expires": True},
            {"expires": 1.5},
            {"expires": 2**64},  # would lose precision as the stored float
            {"expires": int(time.time() * 1000)},  # milliseconds, not seconds
        ):
            reply = await server.call("POST", "/api/user/tokens", body, auth=jwts[ALICE])
            reply.assert_error(400)
        assert (await server.ok("GET", "/api/user/tokens", auth=jwts[ALICE]))["tokens"] == []
        (await server.call("GET", "/api/user/tokens", auth=None)).assert_error(401)


@pytest_twisted.ensureDeferred
async def test_site_admins_manage_everyones_tokens(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        mine = await new_token(server, jwts[ALICE], "alice's")
        theirs = await new_token(server, jwts[CAROL], "carol's")
        listed = (await server.ok("GET", "/api/admin/tokens", auth=jwts[ROOT]))["tokens"]
        assert {(t["id"], t["createdBy"]) for t in listed} == {
            (mine["id"], ALICE),
            (theirs["id"], CAROL),
        }
        # An organization admin is not a site admin.
        forbidden(
            await server.call("GET", "/api/admin/tokens", auth=jwts[ALICE]),
            f"{ALICE} is not an administrator",
        )
        forbidden(
            await server.call("DELETE", f"/api/admin/tokens/{theirs['id']}", auth=jwts[ALICE]),
            "not an administrator",
        )
        carol = f"token {theirs['tokenValue']}"
        assert (await server.call("GET", "/api/user", auth=carol)).code == 200
        reply = await server.call("DELETE", f"/api/admin/tokens/{theirs['id']}", auth=jwts[ROOT])
        assert reply.code == 204, reply.body
        (await server.call("GET", "/api/user", auth=carol)).assert_error(401)
        reply = await server.call("DELETE", f"/api/admin/tokens/{theirs['id']}", auth=jwts[ROOT])
        reply.assert_error(404)
        listed = (await server.ok("GET", "/api/admin/tokens", auth=jwts[ROOT]))["tokens"]
        assert [t["id"] for t in listed] == [mine["id"]]
        alice = f"token {mine['tokenValue']}"
        assert (await server.ok("GET", "/api/user", auth=alice))["githubLogin"] == ALICE


@pytest_twisted.ensureDeferred
async def test_token_expiry(tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        past = int(time.time()) - 1
        reply = await server.call("POST", "/api/user/tokens", {"expires": past}, auth=jwts[CAROL])
        assert "in the past" in reply.assert_error(400)
        expires = int(time.time()) + 2
        created = await new_token(server, jwts[CAROL], "short", expires)
        token = f"token {created['tokenValue']}"
        assert (await server.call("GET", "/api/user", auth=token)).code == 200
        (entry,) = (await server.ok("GET", "/api/user/tokens", auth=token))["tokens"]
        assert entry["expires"] == expires
        await sleep(expires - time.time() + 0.2)
        message = (await server.call("GET", "/api/user", auth=token)).assert_error(401)
        assert "expired" in message, message


# -- token exchange -------------------------------------------------------------------------


def ci_token(provider: OIDCProvider, **changes: Any) -> str:
    now = int(time.time())
    claims = {"sub": CI_SUBJECT, "aud": CI_AUDIENCE, "iat": now, "exp": now + 300, **changes}
    return provider.mint(claims)


def exchange_form(subject_token: str, **changes: str) -> dict[str, str]:
    """What `pulumi login --oidc-token T --oidc-org acme` posts."""
    return {
        "audience": "urn:pulumi:org:acme",
        "grant_type": GRANT,
        "subject_token": subject_token,
        "subject_token_type": ID_TOKEN,
        "requested_token_type": ORG_TOKEN,
        "scope": "",
        "expiration": "7200",
        **changes,
    }


async def post_form(server: Server, data: bytes, **headers: str) -> Reply:
    return await server.call(
        "POST", "/api/oauth/token", data=data, auth=None, headers={**FORM, **headers}
    )


def oauth_error(reply: Reply, status: int, error: str | None = None) -> dict[str, Any]:
    assert reply.code == status, (reply.code, reply.body)
    assert reply.header("content-type") == "application/json"
    body: dict[str, Any] = reply.json()
    assert set(body) == {"code", "message", "error", "error_description"}, body
    assert body["code"] == status
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["error_description"], str) and body["error_description"]
    if error is not None:
        assert body["error"] == error, body
    return body


@pytest_twisted.ensureDeferred
async def test_token_exchange(tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        form = exchange_form(ci_token(provider))
        reply = await post_form(server, urlencode(form).encode())
        assert reply.code == 200, reply.body
        assert reply.header("cache-control") == "no-store"
        body = reply.json()
        assert body["expires_in"] == 600  # asked 7200, the rule caps it
        assert body["issued_token_type"] == ORG_TOKEN
        assert body["token_type"] == "Bearer"
        assert body["scope"] == ""
        token = f"token {body['access_token']}"

        user = await server.ok("GET", "/api/user", auth=token)
        assert user["githubLogin"] == "acme"
        assert [o["githubLogin"] for o in user["organizations"]] == ["acme"]
        assert user["tokenInfo"]["organization"] == "acme"
        assert CI_SUBJECT in user["tokenInfo"]["name"]
        assert user["siteAdmin"] is False

        # The rule's role: write in acme (also on prod: stack rules do not apply).
        assert (await create(server, token, "acme", "ci", "dev")).code == 200
        assert (await create(server, token, "acme", "ci", "prod")).code == 200
        reply = await server.call("PATCH", "/api/stacks/acme/ci/dev/tags", {"a": "b"}, auth=token)
        assert reply.code == 204, reply.body
        forbidden(
            await server.call("DELETE", "/api/stacks/acme/ci/dev", auth=token),
            "acme has the write role on stack acme/ci/dev; this needs admin",
        )
        forbidden(await create(server, token, "other", "ci", "dev"), "none role")
        forbidden(await server.call("GET", "/api/admin/tokens", auth=token))
        # Exchanged tokens do not make more tokens.
        forbidden(
            await server.call("POST", "/api/user/tokens", {}, auth=token),
            "exchanged tokens cannot manage tokens",
        )
        assert stack_ids(await server.ok("GET", "/api/user/stacks", auth=token)) == {
            "acme/ci/dev",
            "acme/ci/prod",
        }
        # It is a stored token: the site admin sees it.
        listed = (await server.ok("GET", "/api/admin/tokens", auth=jwts[ROOT]))["tokens"]
        # Exchanged tokens have a namespace of their own (never a person's login).
        kinds = [(t["kind"], t["createdBy"]) for t in listed]
        assert kinds == [("exchange", "exchange:acme")]
        assert listed[0]["expires"] - time.time() == pytest.approx(600, abs=30)

        # The exchange is in acme's audit log.
        await server.backend.auth.audit.flush()
        events = (
            await server.ok(
                "GET", "/api/orgs/acme/auditlogs?eventFilter=token.exchange", auth=jwts[ALICE]
            )
        )["auditLogEvents"]
        assert [(e["user"]["githubLogin"], e["status"]) for e in events] == [(CI_SUBJECT, 200)]
        assert provider.issuer in events[0]["description"]


@pytest_twisted.ensureDeferred
async def test_team_token_named_after_a_site_admin_is_no_site_admin(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    """The team of a team token is whatever the CI job puts in `scope`; that name must not
    lend the token anyone's powers (here: the site admin's)."""
    async with jwt_daemon(tmp_path, provider) as server:
        form = exchange_form(ci_token(provider), requested_token_type=TEAM_TOKEN)
        form["scope"] = f"team:{ROOT}"
        reply = await post_form(server, urlencode(form).encode())
        assert reply.code == 200, reply.body
        assert reply.json()["issued_token_type"] == TEAM_TOKEN
        token = f"token {reply.json()['access_token']}"
        user = await server.ok("GET", "/api/user", auth=token)
        admin_tokens = await server.call("GET", "/api/admin/tokens", auth=token)
        in_other = await create(server, token, "other", "ci", "dev")
        got = {
            "siteAdmin": user["siteAdmin"],
            "organizations": [o["githubLogin"] for o in user["organizations"]],
            "GET /api/admin/tokens": admin_tokens.code,
            "create a stack in other": in_other.code,
        }
        assert got == {
            "siteAdmin": False,
            "organizations": ["acme"],
            "GET /api/admin/tokens": 403,
            "create a stack in other": 403,
        }


def case_untrusted_issuer(provider: OIDCProvider) -> bytes:
    token = provider.mint(
        {"iss": "http://evil.example", "sub": CI_SUBJECT, "aud": CI_AUDIENCE, "exp": 2**31},
        key="foreign",
    )
    return urlencode(exchange_form(token)).encode()


def case_foreign_key(provider: OIDCProvider) -> bytes:
    token = provider.mint(
        {"sub": CI_SUBJECT, "aud": CI_AUDIENCE, "exp": int(time.time()) + 300}, key="foreign"
    )
    return urlencode(exchange_form(token)).encode()


def form_case(**changes: Any) -> Callable[[OIDCProvider], bytes]:
    def build(provider: OIDCProvider) -> bytes:
        claims = {k: v for k, v in changes.items() if k in ("sub", "aud", "exp")}
        fields = {k: v for k, v in changes.items() if k not in claims}
        form = exchange_form(ci_token(provider, **claims))
        return urlencode({**form, **fields}).encode()

    return build


def raw_case(data: bytes) -> Callable[[OIDCProvider], bytes]:
    return lambda provider: data


EXCHANGE_REFUSALS: list[tuple[str, Callable[[OIDCProvider], bytes], int, str | None]] = [
    ("untrusted-issuer", case_untrusted_issuer, 401, "invalid_grant"),
    ("foreign-key", case_foreign_key, 401, "invalid_grant"),
    ("wrong-subject", form_case(sub="repo:evil/web:ref:refs/heads/main"), 403, "access_denied"),
    ("wrong-audience", form_case(aud="someone-else"), 401, "invalid_grant"),
    ("expired", form_case(exp=int(time.time()) - 600), 401, "invalid_grant"),
    ("no-rule-for-org", form_case(audience="urn:pulumi:org:other"), 403, "access_denied"),
    ("personal", form_case(requested_token_type=PERSONAL_TOKEN), 400, "invalid_request"),
    ("team-without-name", form_case(requested_token_type=TEAM_TOKEN), 400, "invalid_request"),
    ("bad-grant", form_case(grant_type="refresh_token"), 400, "unsupported_grant_type"),
    ("bad-subject-type", form_case(subject_token_type="saml"), 400, "invalid_request"),
    ("bad-audience", form_case(audience="acme"), 400, "invalid_target"),
    ("bad-expiration", form_case(expiration="forever"), 400, "invalid_request"),
    ("zero-expiration", form_case(expiration="0"), 400, "invalid_request"),
    ("not-a-jwt", form_case(subject_token="not-a-jwt"), 400, "invalid_request"),
    ("garbage-form", raw_case(b"%%%garbage&&=&;;"), 400, None),
    ("empty-form", raw_case(b""), 400, None),
    ("not-utf8", raw_case(b"grant_type=\xff\xfe"), 400, None),
    ("too-large", raw_case(b"x=" + b"a" * (64 * 1024)), 413, None),
]


@pytest.mark.parametrize(
    ("build", "status", "error"),
    [pytest.param(b, s, e, id=name) for name, b, s, e in EXCHANGE_REFUSALS],
)
@pytest_twisted.ensureDeferred
async def test_token_exchange_refusals(
    tmp_path: Path,
    provider: OIDCProvider,
    build: Callable[[OIDCProvider], bytes],
    status: int,
    error: str | None,
) -> None:
    data = build(provider)
    async with jwt_daemon(tmp_path, provider) as server:
        oauth_error(await post_form(server, data), status, error)
        # Nothing was issued.
        listed = await server.backend.store.list_tokens(None)
        assert listed == []


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest_twisted.ensureDeferred
async def test_token_exchange_with_a_configured_jwks_url(
    tmp_path: Path, provider: OIDCProvider
) -> None:
    ci = "https://ci.example"
    issuer = {
        "issuer": ci,
        "audience": CI_AUDIENCE,
        "jwks_url": provider.jwks_url,
        "rules": [{"organization": "other", "role": "read", "subject": "job:*"}],
    }
    async with jwt_daemon(tmp_path, provider, issuers=[issuer]) as server:
        token = ci_token(provider, iss=ci, sub="job:42")
        form = exchange_form(token, audience="urn:pulumi:org:other", expiration="60")
        reply = await post_form(server, urlencode(form).encode())
        assert reply.code == 200, reply.body
        assert reply.json()["expires_in"] == 60
        access = f"token {reply.json()['access_token']}"
        user = await server.ok("GET", "/api/user", auth=access)
        assert (user["githubLogin"], user["tokenInfo"]["organization"]) == ("other", "other")
        forbidden(await create(server, access, "other", "svc", "x"), "this needs write")


@pytest.mark.parametrize("configured", [True, False], ids=["jwks-url", "discovery"])
@pytest_twisted.ensureDeferred
async def test_token_exchange_with_an_unreachable_issuer(
    tmp_path: Path, provider: OIDCProvider, configured: bool
) -> None:
    """An issuer whose keys cannot be fetched is the subject token's problem (401
    invalid_grant), whether the JWKS URL is configured or found by discovery."""
    dead = f"http://127.0.0.1:{closed_port()}"
    issuer: dict[str, Any] = {
        "issuer": dead,
        "audience": CI_AUDIENCE,
        "rules": [{"organization": "acme", "role": "read"}],
    }
    if configured:
        issuer["jwks_url"] = f"{dead}/jwks"
    async with jwt_daemon(tmp_path, provider, issuers=[issuer]) as server:
        form = exchange_form(ci_token(provider, iss=dead))
        body = oauth_error(await post_form(server, urlencode(form).encode()), 401, "invalid_grant")
        assert "cannot be fetched" in body["error_description"], body


@pytest_twisted.ensureDeferred
async def test_token_exchange_refusals_are_audited(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        bad = form_case(sub="repo:evil/web")(provider)
        oauth_error(await post_form(server, bad), 403, "access_denied")
        await server.backend.auth.audit.flush()
        events = (await server.ok("GET", "/api/orgs/acme/auditlogs", auth=jwts[ALICE]))[
            "auditLogEvents"
        ]
        assert [(e["event"], e["status"], e["user"]["githubLogin"]) for e in events] == [
            ("token.exchange", 403, "")
        ]


# -- audit log ------------------------------------------------------------------------------


async def audit_page(server: Server, who: str, query: str = "") -> dict[str, Any]:
    await server.backend.auth.audit.flush()
    body: dict[str, Any] = await server.ok("GET", f"/api/orgs/acme/auditlogs{query}", auth=who)
    return body


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(e["event"], e["user"]["githubLogin"], e["status"]) for e in events]


@pytest_twisted.ensureDeferred
async def test_audit_log(tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]) -> None:
    alice, bob, carol = jwts[ALICE], jwts[BOB], jwts[CAROL]
    dev = "/api/stacks/acme/web/dev"
    async with jwt_daemon(tmp_path, provider) as server:
        before = int(time.time())
        assert (await create(server, alice, "acme", "web", "dev")).code == 200
        assert (await server.call("PATCH", f"{dev}/tags", {"a": "b"}, auth=carol)).code == 204
        forbidden(await server.call("DELETE", dev, auth=bob))
        (await create(server, "token nope", "acme", "web", "x")).assert_error(401)
        await new_token(server, carol, "not in any org's log")
        assert (await server.call("DELETE", dev, auth=alice)).code == 204
        after = int(time.time()) + 1

        body = await audit_page(server, alice)
        assert "continuationToken" not in body
        events = body["auditLogEvents"]
        assert summary(events) == [
            ("stack.delete", ALICE, 204),
            ("stack.create", "", 401),
            ("stack.delete", BOB, 403),
            ("stack.tags", CAROL, 204),
            ("stack.create", ALICE, 200),
        ]
        for event in events:
            assert event["sourceIP"] == "127.0.0.1"
            assert before <= event["timestamp"] <= after
            assert event["time"].endswith("Z")
            assert event["user"]["name"] == event["user"]["githubLogin"]
        assert [e["authFailure"] for e in events] == [False, True, False, False, False]
        # A create names the project: the stack is in the body, not the path.
        assert [e["resource"] for e in events] == [
            "acme/web/dev",
            "acme/web",
            "acme/web/dev",
            "acme/web/dev",
            "acme/web",
        ]

        # Only organization admins read it; the refusal is audited too.
        forbidden(
            await server.call("GET", "/api/orgs/acme/auditlogs", auth=bob),
            f"{BOB} has the read role on organization acme; this needs admin",
        )
        forbidden(await server.call("GET", "/api/orgs/acme/auditlogs", auth=carol))
        forbidden(await server.call("GET", "/api/orgs/acme/auditlogs", auth=jwts[DAVE]))
        assert (await server.ok("GET", "/api/orgs/acme/auditlogs", auth=jwts[ROOT])) is not None
        events = (await audit_page(server, alice))["auditLogEvents"]
        assert summary(events[:3]) == [
            ("access", DAVE, 403),
            ("access", CAROL, 403),
            ("access", BOB, 403),
        ]
        assert events[2]["resource"] == "acme"
        # Nothing of acme's shows in other's log.
        other = await server.ok("GET", "/api/orgs/other/auditlogs", auth=jwts[DAVE])
        assert summary(other["auditLogEvents"]) == []

        # Filters.
        by_carol = (await audit_page(server, alice, f"?userFilter={CAROL}"))["auditLogEvents"]
        assert summary(by_carol) == [("access", CAROL, 403), ("stack.tags", CAROL, 204)]
        deletes = (await audit_page(server, alice, "?eventFilter=stack.delete"))["auditLogEvents"]
        assert summary(deletes) == [("stack.delete", ALICE, 204), ("stack.delete", BOB, 403)]
        both = await audit_page(server, alice, f"?eventFilter=stack.delete&userFilter={BOB}")
        assert summary(both["auditLogEvents"]) == [("stack.delete", BOB, 403)]
        # Times: two old events stored directly, and windows around them.
        await server.backend.store.add_audit_events(
            [
                AuditRecord(1000.0, "acme", "old", "stack.create", "acme/p/a", 200, "10.0.0.1"),
                AuditRecord(2000.0, "acme", "old", "stack.delete", "acme/p/a", 204, "10.0.0.1"),
            ]
        )
        window = await audit_page(server, alice, "?startTime=1500&endTime=2500")
        assert summary(window["auditLogEvents"]) == [("stack.delete", "old", 204)]
        assert window["auditLogEvents"][0]["sourceIP"] == "10.0.0.1"
        until = await audit_page(server, alice, "?endTime=1999")
        assert summary(until["auditLogEvents"]) == [("stack.create", "old", 200)]
        since = await audit_page(server, alice, f"?startTime={before}&userFilter=old")
        assert since["auditLogEvents"] == []
        everything = await audit_page(server, alice, "?startTime=0")
        assert len(everything["auditLogEvents"]) == 10
        for query in ("?startTime=-1", "?startTime=yesterday", "?continuationToken=abc"):
            (await server.call("GET", f"/api/orgs/acme/auditlogs{query}", auth=alice)).assert_error(
                400
            )


@pytest_twisted.ensureDeferred
async def test_audit_log_pages(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    bob = jwts[BOB]
    async with jwt_daemon(tmp_path, provider) as server:
        assert (await create(server, jwts[ALICE], "acme", "web", "dev")).code == 200
        for _ in range(130):
            forbidden(await server.call("DELETE", "/api/stacks/acme/web/dev", auth=bob))
        first = await audit_page(server, jwts[ALICE])
        assert len(first["auditLogEvents"]) == 100
        token = first["continuationToken"]
        assert isinstance(token, str) and token
        second = await audit_page(server, jwts[ALICE], f"?continuationToken={token}")
        assert "continuationToken" not in second
        events = first["auditLogEvents"] + second["auditLogEvents"]
        assert len(events) == 131
        assert summary(events) == [("stack.delete", BOB, 403)] * 130 + [
            ("stack.create", ALICE, 200)
        ]
        times = [e["timestamp"] for e in events]
        assert times == sorted(times, reverse=True)
        # Filters page too.
        filtered = await audit_page(server, jwts[ALICE], f"?userFilter={BOB}")
        assert len(filtered["auditLogEvents"]) == 100 and filtered["continuationToken"]
        rest = await audit_page(
            server,
            jwts[ALICE],
            f"?userFilter={BOB}&continuationToken={filtered['continuationToken']}",
        )
        assert len(rest["auditLogEvents"]) == 30 and "continuationToken" not in rest


# -- organizations: members, teams, roles ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_members_teams_roles(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        for who in (jwts[ALICE], jwts[BOB], jwts[ROOT]):
            members = (await server.ok("GET", "/api/orgs/acme/members", auth=who))["members"]
            assert len(members) == 1
            (carol,) = members
            assert carol["user"]["githubLogin"] == CAROL
            assert carol["role"] == "member"
            assert carol["fgaRole"]["name"] == "write"
            teams = (await server.ok("GET", "/api/orgs/acme/teams", auth=who))["teams"]
            assert [(t["name"], t["userRole"]) for t in teams] == [
                ("platform", "admin"),
                ("readers", "read"),
            ]
            roles = (await server.ok("GET", "/api/orgs/acme/roles", auth=who))["roles"]
            assert [r["name"] for r in roles] == ["none", "read", "write", "admin"]
            assert [r["isOrgDefault"] for r in roles] == [True, False, False, False]
        others = (await server.ok("GET", "/api/orgs/other/members", auth=jwts[DAVE]))["members"]
        assert [(m["user"]["githubLogin"], m["role"]) for m in others] == [(DAVE, "admin")]
        assert (await server.ok("GET", "/api/orgs/other/teams", auth=jwts[DAVE]))["teams"] == []
        for path in ("members", "teams", "roles"):
            forbidden(
                await server.call("GET", f"/api/orgs/acme/{path}", auth=jwts[DAVE]),
                f"{DAVE} has the none role on organization acme; this needs read",
            )
            forbidden(await server.call("GET", f"/api/orgs/other/{path}", auth=jwts[EVE]))
            (await server.call("GET", f"/api/orgs/acme/{path}", auth=None)).assert_error(401)
        reply = await server.call("GET", "/api/orgs/nowhere/members", auth=jwts[ROOT])
        reply.assert_error(404)


# -- client addresses -----------------------------------------------------------------------


async def source_ips(server: Server, who: str, headers: dict[str, str]) -> list[str]:
    reply = await server.call(
        "POST", "/api/stacks/acme/web", {"stackName": "dev"}, auth=who, headers=headers
    )
    assert reply.code == 200, reply.body
    events = (await audit_page(server, who))["auditLogEvents"]
    return [e["sourceIP"] for e in events]


@pytest_twisted.ensureDeferred
async def test_forwarded_for_is_ignored_without_trusted_proxies(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider) as server:
        headers = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "198.51.100.1"}
        assert await source_ips(server, jwts[ALICE], headers) == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_forwarded_for_from_a_trusted_proxy(
    tmp_path: Path, provider: OIDCProvider, jwts: dict[str, str]
) -> None:
    async with jwt_daemon(tmp_path, provider, trusted_proxies="127.0.0.1/32") as server:
        headers = {"X-Forwarded-For": "192.0.2.1, 203.0.113.9"}
        assert await source_ips(server, jwts[ALICE], headers) == ["203.0.113.9"]
        forbidden(
            await server.call(
                "DELETE",
                "/api/stacks/acme/web/dev",
                auth=jwts[BOB],
                headers={"X-Real-IP": "198.51.100.1"},
            )
        )
        events = (await audit_page(server, jwts[ALICE]))["auditLogEvents"]
        assert [e["sourceIP"] for e in events] == ["198.51.100.1", "203.0.113.9"]


# -- single-tenant mode ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_tenant_mode_is_unchanged(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        user = await server.ok("GET", "/api/user")
        assert user["githubLogin"] == "alice"
        assert [o["githubLogin"] for o in user["organizations"]] == ["acme"]
        assert user["siteAdmin"] is False
        created = await server.ok("POST", "/api/user/tokens", {"description": "ci"})
        token = f"token {created['tokenValue']}"
        assert (await server.ok("GET", "/api/user", auth=token))["githubLogin"] == "alice"
        assert (await create(server, token, "acme", "web", "dev")).code == 200
        reply = await server.call("DELETE", "/api/stacks/acme/web/dev", auth=token)
        assert reply.code == 204, reply.body  # the site user is admin everywhere
        (entry,) = (await server.ok("GET", "/api/user/tokens", auth=token))["tokens"]
        assert (entry["id"], entry["createdBy"]) == (created["id"], "alice")
        assert (await server.ok("GET", "/api/admin/tokens"))["tokens"][0]["id"] == created["id"]
        await server.backend.auth.audit.flush()
        events = (await server.ok("GET", "/api/orgs/acme/auditlogs", auth=token))["auditLogEvents"]
        assert summary(events) == [("stack.delete", "alice", 204), ("stack.create", "alice", 200)]
        members = (await server.ok("GET", "/api/orgs/acme/members"))["members"]
        assert [(m["user"]["githubLogin"], m["role"]) for m in members] == [("alice", "admin")]
        # The shared token still works; a revoked personal one does not.
        reply = await server.call("DELETE", f"/api/user/tokens/{created['id']}")
        assert reply.code == 204, reply.body
        (await server.call("GET", "/api/user", auth=token)).assert_error(401)
        assert (await server.ok("GET", "/api/user"))["githubLogin"] == "alice"
        (await server.call("GET", "/api/user", auth="token wrong")).assert_error(401)
        # No RBAC file, so no trusted issuers; the endpoint still answers like OAuth.
        oauth_error(await post_form(server, b"grant_type=x"), 400, "unsupported_grant_type")
