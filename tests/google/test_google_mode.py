"""Google mode over HTTP: the in-process daemon signs people in through a real OpenID Connect
provider posing as Google (tests/oidc_provider.py, whose users carry the `hd` claim), and takes
their roles from their Google Workspace groups.

Google has no local server to run in a test, so its two endpoints that pulumid calls for the
groups are faked here at the HTTP level, from Google's documented request and response shapes:

- the OAuth 2.0 token endpoint, for the JWT-bearer grant of a service account with domain-wide
  delegation (RFC 7523; developers.google.com/identity/protocols/oauth2/service-account): a
  form POST of grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer and an RS256 assertion
  signed with the account's private key (iss = client_email, sub = the Workspace user it acts
  as, aud = token_uri, scope, iat/exp at most an hour apart) -> {"access_token", "expires_in",
  "token_type": "Bearer"}, or 400 {"error": "invalid_grant", "error_description"};
- the Admin SDK Directory API's groups.list (GET .../admin/directory/v1/groups?userKey=...
  with `Authorization: Bearer <access token>`), which pages with pageToken / nextPageToken.

The fake verifies the assertion with the public half of a key it generated (the key file it
writes is the one a service account would download), serves 2 groups a page so that paging is
exercised, records every call, and lets a test change who is in which group.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import jwt
import pytest
import pytest_twisted
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request as WebRequest
from twisted.web.server import Site

from pulumid.auth import google, outbound
from pulumid.auth.google import CACHE_SECONDS, ServiceAccount, WorkspaceGroups
from pulumid.auth.oidc import OIDCClient, Sealer, SignInRefused
from pulumid.config import AuthConfig, Config
from pulumid.engine.backend import Backend
from pulumid.errors import Unavailable
from pulumid.tap import make_backend, make_site
from tests.oidc_provider import OIDCProvider, OIDCUser, oidc_provider, sign_in

pytestmark = pytest.mark.live

KEY = "0123456789abcdef" * 4
ORG = "acme"
DOMAIN = "example.com"
ADMIN = "admin@example.com"  # the Workspace admin the service account acts as
SERVICE_ACCOUNT = "pulumid-groups@acme-infra.iam.gserviceaccount.com"

ALICE = "alice@example.com"  # her role comes only from her Workspace groups
CAROL = "carol@example.com"  # site admin by name in the RBAC file
EVE = "eve@other.com"  # another Workspace (hd other.com)
MALLORY = "mallory@example.com"  # a consumer Google account with an example.com address: no hd

PLATFORM = "platform@example.com"
READERS = "readers@example.com"
ONCALL = "oncall@example.com"
EVERYONE = "everyone@example.com"

USERS = (
    OIDCUser("alice", ALICE, [], "Alice Example", hd=DOMAIN),
    OIDCUser("carol", CAROL, [], "Carol Example", hd=DOMAIN),
    OIDCUser("eve", EVE, [], "Eve Other", hd="other.com"),
    OIDCUser("mallory", MALLORY, [], "Mallory"),
)

GROUP_NAMES = {
    PLATFORM: "Platform",
    READERS: "Readers",
    ONCALL: "On call",
    EVERYONE: "Everyone",
}

CLI_PORT = 43219
NOT_IN_DOMAIN = "Forbidden: this Google account is not in an allowed domain"


# -- the fake Google ----------------------------------------------------------------------


@dataclass
class TokenCall:
    claims: dict[str, Any]  # the assertion's claims, as sent (unverified when refused)
    error: str = ""  # error_description when refused
    access_token: str = ""


@dataclass
class DirectoryCall:
    user_key: str
    page_token: str
    max_results: str
    bearer: str


@dataclass
class FakeGoogle:
    """oauth2.googleapis.com/token and admin.googleapis.com/admin/directory/v1/groups."""

    admin: str = ADMIN
    client_email: str = SERVICE_ACCOUNT
    page_size: int = 2
    # Workspace user -> the groups they are a direct member of.
    members: dict[str, list[str]] = field(default_factory=dict)
    token_calls: list[TokenCall] = field(default_factory=list)
    directory_calls: list[DirectoryCall] = field(default_factory=list)
    url: str = ""
    clock: Callable[[], float] = time.time  # what "now" is for iat and exp

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = secrets.token_hex(20)
        self._issued: set[str] = set()

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def directory_url(self) -> str:
        return f"{self.url}/admin/directory/v1"

    def key_file(self, path: Path, key: rsa.RSAPrivateKey | None = None) -> Path:
        """The JSON key file of the service account (as the Cloud console hands it out)."""
        pem = (key or self.key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "acme-infra",
                    "private_key_id": self.key_id,
                    "private_key": pem.decode(),
                    "client_email": self.client_email,
                    "client_id": "104242424242424242424",
                    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def pages_for(self, user: str) -> int:
        return max(1, -(-len(self.members.get(user, [])) // self.page_size))

    # -- the token endpoint

    def token(self, request: WebRequest) -> tuple[int, dict[str, Any]]:
        content_type = request.getHeader("content-type") or ""
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return 400, {"error": "invalid_request", "error_description": "Bad Request"}
        assert request.content is not None
        form = dict(parse_qsl(request.content.read().decode(), keep_blank_values=True))
        if form.get("grant_type") != google.GRANT:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": "Invalid grant_type: " + form.get("grant_type", ""),
            }
        assertion = form.get("assertion", "")
        try:
            sent = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return self._refuse({}, "Invalid JWT.")
        try:
            header = jwt.get_unverified_header(assertion)
            if header.get("alg") != "RS256" or header.get("kid") not in (None, self.key_id):
                return self._refuse(sent, "Invalid JWT Signature.")
            claims = jwt.decode(
                assertion,
                self.key.public_key(),
                algorithms=["RS256"],
                audience=self.token_uri,
                # The times are checked below, against the fake's own clock.
                options={
                    "require": ["iss", "sub", "aud", "iat", "exp", "scope"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            return self._refuse(sent, "Invalid JWT Signature.")
        except jwt.InvalidTokenError as e:
            return self._refuse(sent, f"Invalid JWT: {e}")
        now = self.clock()
        if not int(claims["iat"]) - 60 <= now < int(claims["exp"]):
            return self._refuse(claims, "Invalid JWT: the token is not valid now (iat/exp)")
        if claims["iss"] != self.client_email:
            return self._refuse(claims, "Invalid issuer: " + str(claims["iss"]))
        if claims["sub"] != self.admin:
            return self._refuse(claims, "Invalid email or User ID")
        if google.SCOPE not in str(claims["scope"]).split():
            return self._refuse(claims, "Invalid scope: " + str(claims["scope"]))
        if not 0 < int(claims["exp"]) - int(claims["iat"]) <= 3600:
            return self._refuse(
                claims,
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        access_token = "ya29.fake-" + secrets.token_urlsafe(32)
        self._issued.add(access_token)
        self.token_calls.append(TokenCall(claims, access_token=access_token))
        return 200, {"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}

    def _refuse(self, claims: dict[str, Any], why: str) -> tuple[int, dict[str, Any]]:
        self.token_calls.append(TokenCall(claims, error=why))
        return 400, {"error": "invalid_grant", "error_description": why}

    # -- the Directory API

    def groups(self, request: WebRequest) -> tuple[int, dict[str, Any]]:
        args = parse_qs(urlsplit(request.uri.decode()).query, keep_blank_values=True)
        one = {name: values[-1] for name, values in args.items()}
        scheme, _, bearer = (request.getHeader("authorization") or "").partition(" ")
        self.directory_calls.append(
            DirectoryCall(
                one.get("userKey", ""), one.get("pageToken", ""), one.get("maxResults", ""), bearer
            )
        )
        if scheme != "Bearer" or bearer not in self._issued:
            return _directory_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
                "UNAUTHENTICATED",
            )
        user = one.get("userKey", "").lower()
        if not user:
            return _directory_error(400, "Bad Request", "INVALID_ARGUMENT")
        if user not in self.members:
            return _directory_error(404, "Resource Not Found: userKey", "NOT_FOUND")
        try:
            size = min(int(one.get("maxResults") or 200), 200)
        except ValueError:
            return _directory_error(400, "Invalid value for maxResults", "INVALID_ARGUMENT")
        start = 0
        if one.get("pageToken"):
            try:
                owner, _, offset = (
                    base64.urlsafe_b64decode(one["pageToken"]).decode().rpartition(":")
                )
                start = int(offset)
            except ValueError:
                return _directory_error(400, "Invalid page token", "INVALID_ARGUMENT")
            if owner != user:
                return _directory_error(400, "Invalid page token", "INVALID_ARGUMENT")
        size = min(size, self.page_size)
        everyone = sorted(self.members[user])
        page = everyone[start : start + size]
        body: dict[str, Any] = {"kind": "admin#directory#groups", "etag": _etag(user, page)}
        if page:  # Google leaves out "groups" when there are none
            body["groups"] = [self._group(email) for email in page]
        if start + size < len(everyone):
            body["nextPageToken"] = base64.urlsafe_b64encode(
                f"{user}:{start + size}".encode()
            ).decode()
        return 200, body

    def _group(self, email: str) -> dict[str, Any]:
        count = sum(email in groups for groups in self.members.values())
        return {
            "kind": "admin#directory#group",
            "id": "03" + hashlib.sha256(email.encode()).hexdigest()[:13],
            "etag": _etag(email, []),
            "email": email,
            "name": GROUP_NAMES.get(email, email.partition("@")[0]),
            "directMembersCount": str(count),
            "description": "",
            "adminCreated": True,
            "nonEditableAliases": [email.replace("@", "@acme.test-google-a.com.")],
        }


def _etag(*parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:27]
    return f'"{digest}"'


def _directory_error(code: int, message: str, status: str) -> tuple[int, dict[str, Any]]:
    reason = {401: "authError", 404: "notFound"}.get(code, "invalid")
    return code, {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }
    }


class FakeGoogleResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeGoogle) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Any) -> bytes:
        web = cast(WebRequest, request)
        path = urlsplit(web.uri.decode()).path
        if web.method == b"POST" and path == "/token":
            status, body = self.fake.token(web)
        elif web.method == b"GET" and path == "/admin/directory/v1/groups":
            status, body = self.fake.groups(web)
        else:
            status, body = _directory_error(404, "Not Found", "NOT_FOUND")
        web.setResponseCode(status)
        web.setHeader(b"content-type", b"application/json; charset=UTF-8")
        return json.dumps(body).encode()


@asynccontextmanager
async def fake_google(**options: Any) -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle(**options)
    port: IListeningPort = cast(Any, reactor).listenTCP(
        0, Site(FakeGoogleResource(fake)), interface="127.0.0.1"
    )
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    fake.url = f"http://127.0.0.1:{address.port}"
    try:
        yield fake
    finally:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping


# -- the provider posing as Google, and the daemon ---------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    # The redirect URI is set per daemon (its port is only known once it listens).
    with oidc_provider(["http://127.0.0.1:9/login/callback"], users=USERS) as op:
        yield op


def rbac_file(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "organizations": {
                    ORG: {
                        "default_role": "none",
                        "groups": {PLATFORM: "admin", READERS: "read"},
                    }
                },
                "admins": {"users": [CAROL]},
            }
        )
    )
    return path


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else ""

    def error(self, code: int) -> str:
        """The message of a {"code", "message"} error answer with this status."""
        assert self.code == code, (self.code, self.body)
        body = self.json()
        assert set(body) == {"code", "message"} and body["code"] == code, body
        return str(body["message"])


@dataclass
class Daemon:
    url: str
    agent: Agent
    backend: Backend
    provider: OIDCProvider
    last_nonce: str = ""

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        cookie: str | None = None,
    ) -> Reply:
        """One request, redirects not followed."""
        headers: dict[bytes, list[bytes]] = {}
        if token is not None:
            headers[b"Authorization"] = [f"token {token}".encode()]
        if cookie is not None:
            headers[b"Cookie"] = [cookie.encode()]
        producer = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
        response = await self.agent.request(
            method.encode(), (self.url + path).encode(), Headers(headers), producer
        )
        return Reply(response.code, response.headers, await readBody(response))

    async def callback(self, login: str) -> Reply:
        """The browser's part: /cli-login, the provider's pages as LOGIN, back to the callback
        with the sign-in cookie. Returns the callback's answer."""
        nonce = secrets.token_urlsafe(12)
        query = {"cliSessionPort": str(CLI_PORT), "cliSessionNonce": nonce}
        started = await self.call("GET", "/cli-login?" + urlencode(query))
        assert started.code == 302, (started.code, started.body)
        authorize = started.header("location")
        assert authorize.startswith(self.provider.issuer + "/"), authorize
        assert "code_challenge_method=S256" in authorize
        cookie = started.header("set-cookie").split(";")[0]
        assert cookie.startswith("pulumid_signin="), cookie
        back = await deferToThread(sign_in, authorize, login)
        assert back.startswith(f"{self.url}/login/callback?"), back
        reply = await self.call("GET", back[len(self.url) :], cookie=cookie)
        self.last_nonce = nonce
        return reply

    async def sign_in(self, login: str) -> str:
        """Sign LOGIN in as `pulumi login` would: returns the token handed to the CLI."""
        reply = await self.callback(login)
        assert reply.code == 302, (reply.code, reply.body)
        to_cli = urlsplit(reply.header("location"))
        assert f"{to_cli.scheme}://{to_cli.netloc}{to_cli.path}" == f"http://127.0.0.1:{CLI_PORT}/"
        answer = dict(parse_qsl(to_cli.query))
        assert answer["nonce"] == self.last_nonce
        return answer["accessToken"]

    async def user(self, token: str) -> dict[str, Any]:
        reply = await self.call("GET", "/api/user", token=token)
        assert reply.code == 200, (reply.code, reply.body)
        return cast(dict[str, Any], reply.json())


class _LateSite(Factory):
    """Listens before the site exists: the daemon's public URL (and so its port) is part of
    its configuration."""

    site: Site | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        assert self.site is not None
        built: Protocol | None = self.site.buildProtocol(addr)
        return built


@asynccontextmanager
async def google_daemon(
    tmp_path: Path,
    provider: OIDCProvider,
    fake: FakeGoogle,
    *,
    admin_email: str = ADMIN,
    key: rsa.RSAPrivateKey | None = None,
) -> AsyncIterator[Daemon]:
    late = _LateSite()
    port: IListeningPort = cast(Any, reactor).listenTCP(0, late, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    url = f"http://127.0.0.1:{address.port}"
    await deferToThread(provider.set_redirect_uris, [f"{url}/login/callback"])
    config = Config(
        database=str(tmp_path / "db.sqlite"),
        token="",
        master_key=KEY,
        organization=ORG,
        auth=AuthConfig(
            mode="google",
            rbac_config=str(rbac_file(tmp_path / "rbac.yaml")),
            oidc_issuer=provider.issuer,
            oidc_client_id=provider.client_id,
            oidc_client_secret=provider.client_secret,
            oidc_scopes="openid email profile",
            public_url=url,
            google_hosted_domains=DOMAIN,
            google_service_account_file=str(fake.key_file(tmp_path / "sa.json", key)),
            google_admin_email=admin_email,
            google_directory_url=fake.directory_url,
        ),
    )
    top, backend = make_backend(config, reactor)
    top.startService()
    site = make_site(backend)
    site.doStart()
    late.site = site
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        yield Daemon(url, Agent(reactor, pool=pool), backend, provider)
    finally:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping
        await pool.closeCachedConnections()
        site.doStop()
        stopped = top.stopService()
        if stopped is not None:
            await stopped


def directory_calls(fake: FakeGoogle) -> list[tuple[str, bool]]:
    """(userKey, whether a pageToken was sent) of each Directory call, in order."""
    return [(call.user_key, bool(call.page_token)) for call in fake.directory_calls]


async def create_stack(daemon: Daemon, token: str, name: str) -> Reply:
    return await daemon.call("POST", f"/api/stacks/{ORG}/web", {"stackName": name}, token=token)


# -- the tests ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_workspace_groups_give_the_role(tmp_path: Path, provider: OIDCProvider) -> None:
    async with fake_google() as fake, google_daemon(tmp_path, provider, fake) as daemon:
        # Three groups: two pages of two.
        fake.members = {ALICE: [PLATFORM, ONCALL, EVERYONE], CAROL: [EVERYONE]}
        alice = await daemon.sign_in("alice")

        me = await daemon.user(alice)
        assert me["githubLogin"] == ALICE and me["email"] == ALICE
        assert [o["githubLogin"] for o in me["organizations"]] == [ORG]
        assert me["siteAdmin"] is False
        # platform@example.com -> admin: she may create and delete a stack.
        assert (await create_stack(daemon, alice, "dev")).code == 200
        assert (await daemon.call("DELETE", f"/api/stacks/{ORG}/web/dev", token=alice)).code in (
            200,
            204,
        )
        identity = await daemon.backend.store.get_identity(ALICE)
        assert identity is not None and identity.provider == "google"
        assert identity.groups == (EVERYONE, ONCALL, PLATFORM)

        # One grant for the service account, as the Workspace admin, for the groups scope.
        [grant] = fake.token_calls
        assert grant.error == "" and grant.claims["iss"] == SERVICE_ACCOUNT
        assert grant.claims["sub"] == ADMIN and grant.claims["aud"] == fake.token_uri
        assert google.SCOPE in grant.claims["scope"].split()
        # The Directory API read both pages, with that token.
        assert directory_calls(fake) == [(ALICE, False), (ALICE, True)]
        assert {call.max_results for call in fake.directory_calls} == {"200"}

        # A second person: the access token is reused, not bought again.
        carol = await daemon.sign_in("carol")
        assert (await daemon.user(carol))["siteAdmin"] is True
        assert len(fake.token_calls) == 1
        assert directory_calls(fake) == [(ALICE, False), (ALICE, True), (CAROL, False)]
        assert {call.bearer for call in fake.directory_calls} == {grant.access_token}


@pytest_twisted.ensureDeferred
async def test_a_readers_group_gives_read_only(tmp_path: Path, provider: OIDCProvider) -> None:
    async with fake_google() as fake, google_daemon(tmp_path, provider, fake) as daemon:
        fake.members = {ALICE: [READERS], CAROL: []}
        carol = await daemon.sign_in("carol")
        assert (await create_stack(daemon, carol, "prod")).code == 200

        alice = await daemon.sign_in("alice")
        assert [o["githubLogin"] for o in (await daemon.user(alice))["organizations"]] == [ORG]
        assert (await daemon.call("GET", f"/api/stacks/{ORG}/web/prod", token=alice)).code == 200
        message = (await create_stack(daemon, alice, "dev")).error(403)
        assert ALICE in message and "read" in message, message
        refused = await daemon.call("DELETE", f"/api/stacks/{ORG}/web/prod", token=alice)
        assert "read" in refused.error(403)
        assert directory_calls(fake) == [(CAROL, False), (ALICE, False)]


@pytest_twisted.ensureDeferred
async def test_accounts_outside_the_hosted_domain_are_refused(
    tmp_path: Path, provider: OIDCProvider
) -> None:
    async with fake_google() as fake, google_daemon(tmp_path, provider, fake) as daemon:
        fake.members = {ALICE: [PLATFORM], EVE: [PLATFORM], MALLORY: [PLATFORM]}
        for login in ("eve", "mallory"):  # hd other.com; no hd at all (not Workspace)
            reply = await daemon.callback(login)
            assert reply.error(403) == NOT_IN_DOMAIN
            assert not reply.header("location")
        assert fake.token_calls == [] and fake.directory_calls == []
        assert await daemon.backend.store.list_tokens(None) == []
        assert await daemon.backend.store.list_identities() == []


@pytest_twisted.ensureDeferred
async def test_group_changes_apply_when_an_admin_drops_the_cache(
    tmp_path: Path, provider: OIDCProvider
) -> None:
    async with fake_google() as fake, google_daemon(tmp_path, provider, fake) as daemon:
        fake.members = {ALICE: [PLATFORM], CAROL: []}
        alice = await daemon.sign_in("alice")
        carol = await daemon.sign_in("carol")
        assert (await create_stack(daemon, alice, "a")).code == 200
        assert directory_calls(fake) == [(ALICE, False), (CAROL, False)]

        # alice leaves platform for readers: nothing changes yet, not even when she signs in
        # again (her groups are cached).
        fake.members[ALICE] = [READERS]
        assert (await create_stack(daemon, alice, "b")).code == 200
        alice = await daemon.sign_in("alice")
        assert (await create_stack(daemon, alice, "c")).code == 200
        assert len(fake.directory_calls) == 2

        # Only site admins may drop the cache.
        path = "/api/admin/google-groups-cache"
        (await daemon.call("DELETE", path, token=alice)).error(403)
        assert len(fake.directory_calls) == 2

        dropped = await daemon.call("DELETE", path, token=carol)
        assert dropped.code == 200, dropped.body
        assert dropped.json() == {"dropped": 2, "changed": 1}
        assert directory_calls(fake)[2:] == [(ALICE, False), (CAROL, False)]
        identity = await daemon.backend.store.get_identity(ALICE)
        assert identity is not None and identity.groups == (READERS,)

        # At once: her cached token now carries the readers role.
        assert (await daemon.call("GET", f"/api/stacks/{ORG}/web/a", token=alice)).code == 200
        assert "read" in (await create_stack(daemon, alice, "d")).error(403)
        deleted = await daemon.call("DELETE", f"/api/stacks/{ORG}/web/a", token=alice)
        assert "read" in deleted.error(403)
        # All that on the one access token.
        assert len(fake.token_calls) == 1


@pytest.mark.parametrize("refusal", ["wrong admin", "unknown key"])
@pytest_twisted.ensureDeferred
async def test_a_refused_service_account_fails_sign_in_with_503(
    tmp_path: Path, provider: OIDCProvider, refusal: str
) -> None:
    async with fake_google() as fake:
        fake.members = {ALICE: [PLATFORM]}
        options: dict[str, Any] = (
            {"admin_email": "nobody@example.com"}
            if refusal == "wrong admin"
            else {"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        )
        async with google_daemon(tmp_path, provider, fake, **options) as daemon:
            message = (await daemon.callback("alice")).error(503)
            assert "Google" in message, message
            why = "Invalid email or User ID" if refusal == "wrong admin" else "Signature"
            assert why in message, message
            assert [call.error != "" for call in fake.token_calls] == [True]
            assert fake.directory_calls == []
            assert await daemon.backend.store.list_tokens(None) == []


@pytest_twisted.ensureDeferred
async def test_token_and_groups_lifetimes(tmp_path: Path) -> None:
    """WorkspaceGroups on its own, on a fake clock, against the fake over HTTP."""
    clock = Clock()
    clock.advance(time.time())
    async with fake_google(clock=clock.seconds) as fake:
        fake.members = {ALICE: [PLATFORM, ONCALL, EVERYONE]}
        groups = WorkspaceGroups(
            ServiceAccount.load(str(fake.key_file(tmp_path / "sa.json"))),
            ADMIN,
            outbound.get_json,
            outbound.post_form,
            clock,
            fake.directory_url,
        )
        expected = (EVERYONE, ONCALL, PLATFORM)
        assert await groups.groups_of(ALICE) == expected
        assert await groups.groups_of(ALICE.upper()) == expected
        assert (len(fake.token_calls), len(fake.directory_calls)) == (1, 2)

        # The person's groups are read again after CACHE_SECONDS, with the same access token.
        fake.members[ALICE] = [READERS]
        clock.advance(CACHE_SECONDS + 1)
        assert await groups.groups_of(ALICE) == (READERS,)
        assert (len(fake.token_calls), len(fake.directory_calls)) == (1, 3)

        # A minute before the token expires (expires_in 3599), a new one is bought.
        clock.advance(3599 - 60 - CACHE_SECONDS)
        assert await groups.groups_of(ALICE) == (READERS,)
        assert len(fake.token_calls) == 2
        assert fake.directory_calls[-1].bearer == fake.token_calls[-1].access_token
        iat, exp = fake.token_calls[-1].claims["iat"], fake.token_calls[-1].claims["exp"]
        assert exp - iat == 3600

        # Someone the Directory does not know: Google's 404 becomes a 503.
        with pytest.raises(Unavailable, match="Google's Directory API answered 404"):
            await groups.groups_of("ghost@example.com")


def test_a_blank_hosted_domain_entry_admits_no_one_without_hd() -> None:
    """--google-hosted-domains "example.com," (a stray comma) must not let accounts that have
    no hd claim (consumer Google accounts) through."""
    client = OIDCClient(
        AuthConfig(
            mode="google",
            google_hosted_domains="example.com,",
            oidc_client_id="pulumid",
            public_url="http://127.0.0.1:9",
        ),
        Clock(),
        _never,
        _never,
        Sealer(bytes.fromhex(KEY), b"test"),
    )
    assert client.identity({"sub": "1", "email": ALICE, "hd": DOMAIN})[0] == ALICE
    with pytest.raises(SignInRefused):
        client.identity({"sub": "2", "email": MALLORY})


async def _never(*args: Any) -> Any:
    raise AssertionError("no network here")
