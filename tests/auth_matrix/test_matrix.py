"""The authorization matrix: every route x every kind of caller -> the expected status.

One daemon in jwt mode (served in-process by tests/api/test_api.py `serve`), its JWTs checked
against the JWKS of the real OIDC provider of tests/oidc_provider.py, which also mints every
credential. The RBAC file gives, in organization acme, a reader (by group), a writer (by
user) and an admin (by group); organization `other` has an admin of its own; root is a site
administrator.

Routes: every rule of the one Klein app (pulumid.api.base.app.url_map), with the need
pulumid.api.base.NEEDS declares for it. Each needs an entry in TARGETS below (which stack or
update it aims at, its query and a realistic minimal body): a route without one fails the
test, so a new route must be added here.

Credentials (CALLERS): none, `token garbage`, a JWT signed by a key the provider never
published, the acme admin's JWT expired (beyond the 30 s leeway), the update token of a
running update on another stack, the acme reader, writer and admin, the other
organization's admin, plus two controls: the site admin (the only caller the /api/admin
routes admit) and the update token of the route's own update (the only caller the
update-token routes admit).

Expected (`expect`): on routes that take access tokens, a missing or invalid access token
and any update token are a 401; a role below the need is a 403; at or above it, the handler
decides (anything but 401/403 and never 5xx: it may answer 404/409/400 for a minimal body).
Update-token routes: no credentials, any access token (valid, invalid or expired) and another
update's token are all a 403 (the handler asks for an update token before it reads the body,
so the gate's 401 for an invalid access token never shows); only the update's own token gets
through. Public routes (token exchange, browser
sign-in) answer the same to every caller, never 401 or 5xx.

Nothing changes where refused: after every request that is not a 2xx, a snapshot (the
stacks of the current targets with versions and tags, the idle stack's export and history,
every token through /api/admin/tokens as the site admin, and every row of the daemon's
SQLite database except the audit trail) must equal the one taken before it.

Cells run per route, refusals first; after a route whose admitted requests changed
something, the targets are built afresh (new stacks, updates and tokens).
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred

import pulumid.api.app  # noqa: F401  (defines every route on the one Klein app)
from pulumid.api.base import NEEDS, app
from pulumid.auth.access import Need
from pulumid.auth.roles import Role
from pulumid.config import AuthConfig
from tests.api import hostile_inputs as h
from tests.api.test_api import Server, serve
from tests.oidc_provider import OIDCProvider, oidc_provider

pytestmark = pytest.mark.live

ORG = "acme"
OTHER_ORG = "other"
PROJECT = "p"
AUDIENCE = "pulumid"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # nothing listens: no browser sign-in here

RBAC = f"""
organizations:
  {ORG}:
    users:
      writer@example.com: write
    groups:
      acme-readers: read
      acme-admins: admin
  {OTHER_ORG}:
    users:
      boss@other.example: admin
admins:
  users: [root@example.com]
"""

# Database tables that refusals may change: the audit trail records them.
AUDIT_TABLES = {"audit_events", "sqlite_sequence"}


# -- callers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    kind: str  # "none", "invalid" (not a credential the daemon accepts), "user", "update"
    role: Role = Role.NONE  # the role in organization acme (users)
    site_admin: bool = False
    own_update: bool = False  # update tokens: the route's own update (else another's)
    control: bool = False  # not in the list: a positive control


@dataclass(frozen=True)
class Person:
    email: str
    groups: tuple[str, ...] = ()


PEOPLE = {
    "reader": Person("reader@example.com", ("acme-readers",)),
    "writer": Person("writer@example.com"),
    "admin": Person("admin@example.com", ("acme-admins",)),
    "other org's admin": Person("boss@other.example", ("other-admins",)),
    "site admin": Person("root@example.com"),
}

CALLERS: tuple[Caller, ...] = (
    Caller("no token", "none"),
    Caller("garbage token", "invalid"),
    Caller("foreign-key JWT", "invalid"),
    Caller("expired JWT", "invalid"),
    Caller("another update's token", "update"),
    Caller("reader", "user", Role.READ),
    Caller("writer", "user", Role.WRITE),
    Caller("admin", "user", Role.ADMIN),
    Caller("other org's admin", "user", Role.NONE),
    Caller("site admin", "user", Role.ADMIN, site_admin=True, control=True),
    Caller("own update's token", "update", own_update=True, control=True),
)


@dataclass(frozen=True)
class Expect:
    """Exactly one of `codes` (a refusal), or admitted: anything but 401/403 and 5xx."""

    codes: frozenset[int] = frozenset()

    @property
    def admitted(self) -> bool:
        return not self.codes

    def holds(self, status: int) -> bool:
        if self.codes:
            return status in self.codes
        return status not in (401, 403) and status < 500

    def describe(self) -> str:
        if self.codes:
            return " or ".join(map(str, sorted(self.codes)))
        return "admitted (not 401/403/5xx)"


ADMITTED = Expect()
UNAUTHORIZED = Expect(frozenset({401}))
FORBIDDEN = Expect(frozenset({403}))


def expect(need: Need, caller: Caller) -> Expect:
    """What CALLER gets from a route that needs NEED (not for public routes)."""
    if need.scope == "update":
        # The handler asks for an update token before it reads the body, so the gate's 401
        # for a missing or invalid access token is never seen: "Forbidden: an update token is
        # required" (403) for every access token or none; another update's token is a 403
        # too ("the update token is not valid for this update").
        return ADMITTED if caller.own_update else FORBIDDEN
    if caller.kind != "user":
        return UNAUTHORIZED  # no access token, an invalid one, or an update token
    if need.scope == "signed-in":
        return ADMITTED
    if need.scope == "site-admin":
        return ADMITTED if caller.site_admin else FORBIDDEN
    if need.scope in ("org", "stack"):
        return ADMITTED if caller.role >= need.role else FORBIDDEN
    raise AssertionError(f"a need the matrix does not know: {need}; extend expect()")


# -- what each route is sent -----------------------------------------------------------------


@dataclass
class World:
    """The targets of one generation, all in acme/p: `idle` has state (imported), tags and a
    secret; `running` has a running update (a verbatim checkpoint in it); `journal` a
    running journaling update; `pending` an update created but not started. Tokens: one of
    the acme admin's, one of the writer's."""

    generation: int
    idle: str = ""
    running: str = ""
    running_update: str = ""
    running_token: str = ""
    baseline: bytes = b""  # the running update's state as exported (delta checkpoints)
    journal: str = ""
    journal_update: str = ""
    journal_token: str = ""
    pending: str = ""
    pending_update: str = ""
    ciphertext: str = ""
    admin_token: str = ""
    writer_token: str = ""

    def stack(self, which: str) -> str:
        name: str = getattr(self, which)
        return name

    def update(self, which: str) -> tuple[str, str]:
        """(update id, update token) of a target stack; stacks without a running update of
        their own lend the running one's token (its routes refuse update tokens anyway)."""
        if which == "journal":
            return self.journal_update, self.journal_token
        if which == "pending":
            return self.pending_update, self.running_token
        return self.running_update, self.running_token


Body = Callable[[World, int], Any]


@dataclass(frozen=True)
class Target:
    stack: str = "idle"  # which World stack fills <stack> (and <update_id>)
    body: Body | None = None  # a JSON body, from the world and a fresh number
    form: bytes | None = None  # a form body (the token exchange)
    query: str = ""
    token: str = "admin"  # whose token fills <token_id>: "admin" or "writer"
    # Why no admitted caller can get a 2xx from this daemon (jwt mode); "" if one can.
    never_ok: str = ""


def _events(w: World, n: int) -> Any:
    return {
        "events": [
            {"sequence": n, "timestamp": 1_700_000_000, "stdoutEvent": {"message": "hi"}},
            {
                "sequence": n + 1,
                "timestamp": 1_700_000_001,
                "summaryEvent": {"resourceChanges": {"create": 1}, "result": "succeeded"},
            },
        ]
    }


def _journal(w: World, n: int) -> Any:
    res = h.resource(f"journal-{n}", n)
    return {
        "entries": [
            {
                "version": 1,
                "kind": 0,
                "sequenceID": n,
                "operationID": n,
                "operation": {"resource": res, "type": "creating"},
            },
            {"version": 1, "kind": 1, "sequenceID": n + 1, "operationID": n, "state": res},
        ]
    }


def _delta(w: World, n: int) -> Any:
    return h.delta_body(w.baseline, h.dumps(h.untyped([h.resource("delta", n)])), n)


TARGETS: dict[str, Target] = {
    # signed in
    "user:GET": Target(),
    "default_org:GET": Target(),
    "capabilities:GET": Target(),
    "templates:GET": Target(),
    "packages:GET": Target(),
    "list_stacks:GET": Target(),
    "list_tokens:GET": Target(),
    "create_token:POST": Target(body=lambda w, n: {"description": f"matrix {n}", "expires": 0}),
    "delete_token:DELETE": Target(token="admin"),
    # site admins
    "all_tokens:GET": Target(),
    "revoke_any_token:DELETE": Target(token="writer"),
    "site_audit_logs:GET": Target(),
    "drop_groups_cache:DELETE": Target(never_ok="404: Workspace groups exist in google mode only"),
    "take_backup:POST": Target(never_ok="404: no backup destination in the matrix's daemon"),
    "list_backups:GET": Target(never_ok="404: no backup destination in the matrix's daemon"),
    "keys:GET": Target(),
    "rotate:POST": Target(),
    # organizations
    "members:GET": Target(),
    "teams:GET": Target(),
    "roles:GET": Target(),
    "audit_logs:GET": Target(),
    "project_exists:HEAD": Target(),
    "create_stack:POST": Target(body=lambda w, n: {"stackName": f"made{n}"}),
    # stacks
    "get_stack:GET": Target(),
    "delete_stack:DELETE": Target(query="force=true"),
    "rename:POST": Target(body=lambda w, n: {"newName": f"renamed{n}"}),
    "tags:PATCH": Target(body=lambda w, n: {"team": "blue"}),
    "export:GET": Target(),
    "export_version:GET": Target(),
    "import_:POST": Target(body=lambda w, n: h.untyped([h.resource("imported", n)])),
    "history:GET": Target(),
    "latest:GET": Target(),
    "update_by_version:GET": Target(),
    "update_summary:GET": Target(),
    "encrypt:POST": Target(body=lambda w, n: {"plaintext": h.b64(b"hunter2")}),
    "decrypt:POST": Target(body=lambda w, n: {"ciphertext": w.ciphertext}),
    "batch_encrypt:POST": Target(body=lambda w, n: {"plaintexts": [h.b64(b"a"), h.b64(b"b")]}),
    "batch_decrypt:POST": Target(body=lambda w, n: {"ciphertexts": [w.ciphertext]}),
    "log_decryption:POST": Target(body=lambda w, n: {}),
    "log_batch_decryption:POST": Target(body=lambda w, n: {}),
    # updates (access tokens)
    "create_update:POST": Target(
        body=lambda w, n: {
            "name": PROJECT,
            "runtime": "yaml",
            "options": {"dryRun": False},
            "config": {},
            "metadata": {"message": f"matrix {n}"},
        }
    ),
    "start_update:POST": Target("pending", body=lambda w, n: {"tags": {}}),
    "update_status:GET": Target("running"),
    "get_events:GET": Target("running"),
    "cancel:POST": Target("running"),
    # updates (update tokens)
    "renew_lease:POST": Target("running", body=lambda w, n: {"duration": 300}),
    "checkpoint:PATCH": Target(
        "running",
        body=lambda w, n: {
            "isInvalid": False,
            "version": 3,
            "deployment": h.deployment_doc([h.resource("checkpointed", n)]),
        },
    ),
    "checkpoint_verbatim:PATCH": Target(
        "running",
        body=lambda w, n: {
            "version": 1,
            "untypedDeployment": h.untyped([h.resource("verbatim", n)]),
            "sequenceNumber": n,
        },
    ),
    "checkpoint_delta:PATCH": Target("running", body=_delta),
    "journal_entries:PATCH": Target("journal", body=_journal),
    "post_events:POST": Target("running", body=_events),
    "post_event:POST": Target(
        "running",
        body=lambda w, n: {
            "sequence": n,
            "timestamp": 1_700_000_000,
            "diagnosticEvent": {"message": "note", "color": "raw", "severity": "info"},
        },
    ),
    "complete:POST": Target("running", body=lambda w, n: {"status": "succeeded"}),
    # public
    "oauth_token:POST": Target(form=b"grant_type=password&username=x&password=y"),
    "cli_login:GET": Target(query="cliSessionPort=8400&cliSessionNonce=n-1"),
    "callback:GET": Target(query="code=c&state=s"),
    "welcome:GET": Target(),
    "openapi:GET": Target(),
}


@dataclass(frozen=True)
class RouteRule:
    endpoint: str  # "name:METHOD"
    method: str
    rule: str  # the path with <converters>

    @property
    def name(self) -> str:
        return self.endpoint.split(":")[0]


def routes() -> list[RouteRule]:
    found = []
    for rule in app.url_map.iter_rules():
        endpoint = str(rule.endpoint)
        found.append(RouteRule(endpoint, endpoint.rsplit(":", 1)[1], rule.rule))
    return sorted(found, key=lambda r: (r.rule, r.method))


ROUTES = routes()
CELLS = len(ROUTES) * len(CALLERS)
_PARAM = re.compile(r"<(?:[^<>]*:)?(\w+)>")


def fill(route: RouteRule, target: Target, world: World) -> str:
    update, _token = world.update(target.stack)
    values = {
        "org": ORG,
        "project": PROJECT,
        "stack": world.stack(target.stack),
        "kind": "update",
        "update_id": update,
        "version": "1",
        "token_id": world.admin_token if target.token == "admin" else world.writer_token,
    }

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise AssertionError(
                f"{route.endpoint} {route.rule}: the matrix cannot fill <{name}>; extend fill()"
            )
        return values[name]

    path = _PARAM.sub(value, route.rule)
    return f"{path}?{target.query}" if target.query else path


def test_every_route_has_a_target() -> None:
    """A new route fails here until TARGETS (and, for a new kind of need, expect()) cover it."""
    endpoints = {r.endpoint for r in ROUTES}
    assert endpoints == set(NEEDS), (endpoints ^ set(NEEDS), "url_map and NEEDS disagree")
    missing = sorted(endpoints - set(TARGETS))
    assert not missing, f"routes without a target in the auth matrix: {missing}"
    stale = sorted(set(TARGETS) - endpoints)
    assert not stale, f"matrix targets of routes that no longer exist: {stale}"
    scopes = {need.scope for need in NEEDS.values()}
    assert scopes <= {"public", "signed-in", "site-admin", "org", "stack", "update"}, scopes


# -- the provider and the credentials --------------------------------------------------------


@pytest.fixture(scope="module")
def op() -> Iterator[OIDCProvider]:
    with oidc_provider([REDIRECT_URI]) as provider:
        yield provider


def _claims(person: Person, now: int, lifetime: int = 3600) -> dict[str, Any]:
    return {
        "sub": person.email.split("@")[0],
        "email": person.email,
        "groups": list(person.groups),
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
    }


@pytest.fixture(scope="module")
def jwts(op: OIDCProvider) -> dict[str, str]:
    """Caller name -> JWT, minted by the provider (blocking: before the daemon runs)."""
    now = int(time.time())
    tokens = {name: op.mint(_claims(person, now)) for name, person in PEOPLE.items()}
    admin = PEOPLE["admin"]
    tokens["foreign-key JWT"] = op.mint(_claims(admin, now), key="foreign")
    expired = _claims(admin, now - 3600, lifetime=3600 - 120)  # ended 2 minutes ago
    tokens["expired JWT"] = op.mint(expired)
    return tokens


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Cell:
    route: RouteRule
    caller: Caller
    expected: Expect | None  # None: a public route (the same answer for every caller)
    status: int
    body: bytes
    path: str

    def row(self) -> dict[str, Any]:
        need = NEEDS[self.route.endpoint]
        return {
            "route": f"{self.route.method} {self.route.rule}",
            "need": f"{need.scope} {need.role.label}",
            "caller": self.caller.name,
            "expected": self.expected.describe() if self.expected else "as without credentials",
            "status": self.status,
        }

    def line(self) -> str:
        expected = self.expected.describe() if self.expected else "as without credentials"
        return (
            f"{self.route.method} {self.path} [{self.caller.name}]: expected {expected}, "
            f"got {self.status} {self.body[:200]!r}"
        )


@dataclass
class Matrix:
    server: Server
    database: Path
    jwts: dict[str, str]
    cells: list[Cell] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    snapshots: int = 0
    compared: int = 0  # snapshots compared with the one before a non-2xx answer
    rebuilds: int = 0
    other_token: str = ""
    other_stack: str = "s2"
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(2, 2))
    generations: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- requests ------------------------------------------------------------------------

    def auth(self, caller: Caller, own_update_token: str) -> str | None:
        if caller.kind == "none":
            return None
        if caller.name == "garbage token":
            return "token garbage"
        if caller.kind == "update":
            return f"update-token {own_update_token if caller.own_update else self.other_token}"
        return f"token {self.jwts[caller.name]}"

    def as_person(self, name: str) -> str:
        return f"token {self.jwts[name]}"

    async def setup(self, method: str, path: str, body: Any = None, who: str = "admin") -> Any:
        """A request that must succeed (as the acme admin unless said otherwise)."""
        reply = await self.server.call(method, path, body, auth=self.as_person(who))
        assert 200 <= reply.code < 300, (method, path, reply.code, reply.body)
        return reply.json() if reply.body and method != "HEAD" else None

    async def create_stack(self, name: str) -> str:
        await self.setup("POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": name})
        return f"/api/stacks/{ORG}/{PROJECT}/{name}"

    async def start(self, base: str, start: dict[str, Any]) -> tuple[str, str]:
        created = await self.setup("POST", f"{base}/update", {"options": {"dryRun": False}})
        started = await self.setup("POST", f"{base}/update/{created['updateID']}", start)
        return str(created["updateID"]), str(started["token"])

    async def begin(self) -> None:
        """The credentials are what they claim to be; the other update runs on acme/p/s2
        (its token is a credential)."""
        for name, person in PEOPLE.items():
            me = await self.setup("GET", "/api/user", who=name)
            orgs = [o["githubLogin"] for o in me["organizations"]]
            assert (me["githubLogin"], me["siteAdmin"]) == (person.email, name == "site admin")
            expected_orgs = {"site admin": [ORG, OTHER_ORG], "other org's admin": [OTHER_ORG]}
            assert orgs == expected_orgs.get(name, [ORG]), (name, orgs)
        for name, why in (
            ("expired JWT", "the token has expired"),
            ("foreign-key JWT", "signing key"),
        ):
            reply = await self.server.call("GET", "/api/user", auth=self.as_person(name))
            assert why in reply.assert_error(401), (name, reply.body)
        base = await self.create_stack(self.other_stack)
        _update, self.other_token = await self.start(base, {})

    async def build(self) -> World:
        g = next(self.generations)
        w = World(g, idle=f"idle{g}", running=f"run{g}", journal=f"jour{g}", pending=f"pend{g}")
        idle = await self.create_stack(w.idle)
        await self.setup("POST", f"{idle}/import", h.untyped([h.resource("idle", 1)]))
        await self.setup("PATCH", f"{idle}/tags", {"team": "red"})
        secret = await self.setup("POST", f"{idle}/encrypt", {"plaintext": h.b64(b"pw")})
        w.ciphertext = secret["ciphertext"]
        running = await self.create_stack(w.running)
        w.running_update, w.running_token = await self.start(running, {})
        verbatim = {
            "version": 1,
            "untypedDeployment": h.untyped([h.resource("run", 1)]),
            "sequenceNumber": 1,
        }
        reply = await self.server.call(
            "PATCH",
            f"{running}/update/{w.running_update}/checkpointverbatim",
            verbatim,
            auth=f"update-token {w.running_token}",
        )
        assert reply.code == 204, reply
        exported = await self.server.call("GET", f"{running}/export", auth=self.as_person("admin"))
        assert exported.code == 200, exported
        w.baseline = exported.body
        journal = await self.create_stack(w.journal)
        w.journal_update, w.journal_token = await self.start(journal, {"journalVersion": 1})
        pending = await self.create_stack(w.pending)
        created = await self.setup("POST", f"{pending}/update", {"options": {"dryRun": False}})
        w.pending_update = created["updateID"]
        w.admin_token = (await self.setup("POST", "/api/user/tokens", {"description": "a"}))["id"]
        made = await self.setup("POST", "/api/user/tokens", {"description": "w"}, who="writer")
        w.writer_token = made["id"]
        self.rebuilds += 1
        return w

    # -- observing -------------------------------------------------------------------------

    async def _view(self, name: str, path: str) -> tuple[str, str]:
        reply = await self.server.call("GET", path, auth=self.as_person("site admin"))
        return name, f"{reply.code} {reply.body.decode('utf-8', 'replace')}"

    async def snapshot(self, world: World) -> dict[str, str]:
        """The API's view (as the site admin) and every non-audit row of the database."""
        self.snapshots += 1
        base = f"/api/stacks/{ORG}/{PROJECT}"
        paths = {
            "stack list": "/api/user/stacks",
            "tokens": "/api/admin/tokens",
            "export idle": f"{base}/{world.idle}/export",
            "history idle": f"{base}/{world.idle}/updates",
            "history running": f"{base}/{world.running}/updates",
            "status running": f"{base}/{world.running}/update/{world.running_update}",
            "status pending": f"{base}/{world.pending}/update/{world.pending_update}",
        }
        for which in ("idle", "running", "journal", "pending"):
            paths[f"stack {which}"] = f"{base}/{world.stack(which)}"
        paths["stack s2"] = f"{base}/{self.other_stack}"
        views: list[tuple[str, str]] = await defer.gatherResults(
            [Deferred.fromCoroutine(self._view(name, path)) for name, path in paths.items()]
        )
        snapshot = dict(views)
        snapshot.update(dump_database(self.database))
        return snapshot

    # -- cells -----------------------------------------------------------------------------

    async def send(self, route: RouteRule, caller: Caller, world: World) -> Cell:
        target = TARGETS[route.endpoint]
        path = fill(route, target, world)
        _update, own = world.update(target.stack)
        auth = self.auth(caller, own)
        need = NEEDS[route.endpoint]
        expected = None if need.scope == "public" else expect(need, caller)
        if target.form is not None:
            reply = await self.server.call(
                route.method,
                path,
                data=target.form,
                auth=auth,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            body = target.body(world, next(self.numbers)) if target.body else None
            reply = await self.server.call(route.method, path, body, auth=auth)
        cell = Cell(route, caller, expected, reply.code, reply.body, path)
        self.cells.append(cell)
        return cell

    async def run(self) -> None:
        await self.begin()
        world = await self.build()
        before = await self.snapshot(world)
        for route in ROUTES:
            need = NEEDS[route.endpoint]
            callers = list(CALLERS)
            if need.scope != "public":  # refusals first, then the admitted in CALLERS order
                callers.sort(key=lambda c: expect(need, c).admitted)
            changed_something = False
            first: Cell | None = None
            for caller in callers:
                cell = await self.send(route, caller, world)
                if cell.expected is not None:
                    if not cell.expected.holds(cell.status):
                        self.failures.append(cell.line())
                else:
                    first = first or cell
                    if cell.status != first.status or cell.status == 401 or cell.status >= 500:
                        self.failures.append(f"{cell.line()} (without credentials: {first.status})")
                after = await self.snapshot(world)
                if 200 <= cell.status < 300:
                    changed_something = changed_something or route.method not in ("GET", "HEAD")
                else:
                    self.compared += 1
                    self.changed.extend(
                        f"{route.method} {cell.path} [{cell.caller.name}] -> {cell.status}, "
                        f"yet {line}"
                        for line in diff(before, after)
                    )
                before = after
            if changed_something:
                world = await self.build()
                before = await self.snapshot(world)

    # -- results ---------------------------------------------------------------------------

    def admitted_without_success(self) -> list[str]:
        """Protected routes where no admitted caller got a 2xx: a target or body is wrong."""
        lines = []
        for route in ROUTES:
            mine = [c for c in self.cells if c.route == route]
            if NEEDS[route.endpoint].scope == "public" or TARGETS[route.endpoint].never_ok:
                continue
            if not any(c.expected and c.expected.admitted and 200 <= c.status < 300 for c in mine):
                statuses = {c.caller.name: c.status for c in mine if c.expected}
                lines.append(f"{route.endpoint} {route.rule}: no admitted 2xx ({statuses})")
        return lines

    def summary(self, seconds: float) -> str:
        protected = [r for r in ROUTES if NEEDS[r.endpoint].scope != "public"]
        refused = [c for c in self.cells if c.expected and not c.expected.admitted]
        admitted = [c for c in self.cells if c.expected and c.expected.admitted]
        statuses = Counter(c.status for c in refused)
        admitted_ok = sum(1 for c in admitted if 200 <= c.status < 300)
        return (
            f"auth matrix: {len(ROUTES)} routes x {len(CALLERS)} credentials "
            f"({sum(not c.control for c in CALLERS)} of the issue + "
            f"{sum(c.control for c in CALLERS)} controls) = "
            f"{len(self.cells)} cells ({len(protected)} protected routes, "
            f"{len(ROUTES) - len(protected)} public); refusals: {len(refused)} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}); admitted: "
            f"{len(admitted)} ({admitted_ok} 2xx); public cells: "
            f"{len(self.cells) - len(refused) - len(admitted)}; non-2xx answers checked "
            f"for changes: {self.compared} ({self.snapshots} snapshots); target rebuilds: "
            f"{self.rebuilds}; wrong answers: "
            f"{len(self.failures)}; refused but changed: {len(self.changed)}; {seconds:.1f}s"
        )


def dump_database(path: Path) -> dict[str, str]:
    """Every row of every table but the audit trail's, read in one transaction."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        tables = [
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        dump = {}
        for table in sorted(set(tables) - AUDIT_TABLES):
            rows = sorted(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
            dump[f"table {table}"] = "\n".join(rows)
        conn.execute("COMMIT")
        return dump
    finally:
        conn.close()


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "(absent)"), after.get(key, "(absent)")
        if old == new:
            continue
        if key.startswith("table "):  # rows: say which went and which came
            gone = sorted(set(old.split("\n")) - set(new.split("\n")))
            came = sorted(set(new.split("\n")) - set(old.split("\n")))
            lines.append(f"{key}: rows gone {gone!r:.400}, rows new {came!r:.400}")
        else:
            lines.append(f"{key} changed: {old[:400]!r} -> {new[:400]!r}")
    return lines


def announce(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture (the summary is meant to be quoted)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    else:
        print(line)


@pytest.mark.parametrize("size", [f"{len(ROUTES)}x{len(CALLERS)}={CELLS}cells"])
@pytest_twisted.ensureDeferred
async def test_auth_matrix(
    size: str,
    tmp_path: Path,
    jwts: dict[str, str],
    op: OIDCProvider,
    request: pytest.FixtureRequest,
) -> None:
    missing = sorted({r.endpoint for r in ROUTES} - set(TARGETS))
    assert not missing, f"routes without a target in the auth matrix: {missing}"
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text(RBAC)
    auth = AuthConfig(
        mode="jwt",
        rbac_config=str(rbac),
        jwt_jwks_url=op.jwks_url,
        jwt_issuer=op.issuer,
        jwt_audience=AUDIENCE,
    )
    started = time.monotonic()
    async with serve(tmp_path, token="", auth=auth, lease_ttl=3600.0) as server:
        matrix = Matrix(server, tmp_path / "db.sqlite", jwts)
        await matrix.run()
        await server.backend.auth.audit.flush()
    seconds = time.monotonic() - started
    table = tmp_path / "matrix.json"
    table.write_text(json.dumps([cell.row() for cell in matrix.cells], indent=1))
    announce(request, f"{matrix.summary(seconds)}; every cell: {table}")
    assert len(matrix.cells) == CELLS
    problems = []
    if matrix.failures:
        problems.append(f"{len(matrix.failures)} wrong answers:")
        problems += [f"  {line}" for line in matrix.failures]
    if matrix.changed:
        problems.append(f"{len(matrix.changed)} refused requests changed something:")
        problems += [f"  {line}" for line in matrix.changed]
    if weak := matrix.admitted_without_success():
        problems.append("routes whose admitted callers all failed (fix the target or body):")
        problems += [f"  {line}" for line in weak]
    assert not problems, "\n".join(problems)
