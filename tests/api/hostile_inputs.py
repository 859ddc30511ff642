"""Hostile request material for test_hostile.py: routes, credentials, spoiled bodies, odd paths.

Nothing here talks to a server. A probe is a symbolic description (which route, which of the
current stacks or updates it aims at, which credentials, how the body is spoiled, which path
segment is twisted); test_hostile.py turns it into bytes against the stacks and updates it
holds at that moment. Keeping probes symbolic makes hypothesis' choices readable in reports
and independent of the random ids and tokens the daemon hands out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from hypothesis import strategies as st

MIB = 1 << 20
MAX_BODY_SIZE = MIB  # the daemon under test runs with --max-body-size 1 MiB
OVERSIZE = MAX_BODY_SIZE + 3 * MIB  # "a few MB over"
BOMB_SIZE = 100 * 1000 * 1000  # gzip bomb: 100 MB of zeros
NESTING = 100_000  # nested arrays

# -- JSON text the standard library will not write on its own ------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON source text written as is (NaN, 1e400, a lone surrogate escape, ...)."""

    text: str


@dataclass(frozen=True)
class Dup:
    """An object written with repeated keys, in this order."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Deep:
    """NESTING nested arrays: [[[[...]]]]."""


# Replaced by invalid UTF-8 bytes after encoding (a JSON string cannot carry them).
BAD_UTF8_MARK = "\x01bad-utf8\x01"
BAD_UTF8_BYTES = b"\xff\xfe\xc0\xaf"


def dumps(value: Any) -> str:
    """JSON text of value; Raw, Dup and Deep are written verbatim, floats may be NaN."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Deep):
        return "[" * NESTING + "]" * NESTING
    if isinstance(value, Dup):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    # ensure_ascii: lone surrogates in str become \udXXX escapes; nan/inf become NaN/Infinity.
    return json.dumps(value)


def encode(value: Any) -> bytes:
    text = dumps(value).encode("utf-8", "surrogatepass")
    return text.replace(json.dumps(BAD_UTF8_MARK).encode(), b'"' + BAD_UTF8_BYTES + b'"')


NON_FINITE = {
    "NaN": Raw("NaN"),
    "Infinity": Raw("Infinity"),
    "-Infinity": Raw("-Infinity"),
    "1e400": Raw("1e400"),
    "-1e400": Raw("-1e400"),
}
BIG_INTS = {
    "10**20": Raw(str(10**20)),
    "2**63": Raw(str(2**63)),
    "2**64-1": Raw(str(2**64 - 1)),
    "2**64": Raw(str(2**64)),
    "-1": Raw("-1"),
    "-2**63-1": Raw(str(-(2**63) - 1)),
}
SURROGATES = {
    "lone-surrogate": Raw('"\\ud800"'),
    "lone-low-surrogate": Raw('"\\udc00x"'),
}
NON_STANDARD = {**NON_FINITE, **BIG_INTS, **SURROGATES}
WRONG_TYPES: dict[str, Any] = {
    "null": None,
    "true": True,
    "float": 1.5,
    "string": "x",
    "list": [],
    "object": {},
    "list-of-null": [None],
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- routes ---------------------------------------------------------------------------------

BASE = "/api/stacks/{org}/{project}/{stack}"
UPDATE = BASE + "/{kind}/{update}"


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    template: str  # placeholders: org, project, stack, kind, update, version
    auth: str  # "user" or "update": which credentials the route wants
    has_body: bool = False
    queries: tuple[str, ...] = ()  # query parameters it reads
    target: str = "C"  # the natural target: a stack (A, B, C) or an update (U1, U2, U3, N)

    @property
    def placeholders(self) -> tuple[str, ...]:
        names = ("org", "project", "stack", "kind", "update", "version")
        return tuple(p for p in names if "{" + p + "}" in self.template)

    @property
    def is_update_route(self) -> bool:
        return "{update}" in self.template


AUDIT_QUERIES = ("continuationToken", "startTime", "endTime", "userFilter", "eventFilter")

ROUTES: tuple[Route, ...] = (
    Route("user", "GET", "/api/user", "user"),
    Route("default_org", "GET", "/api/user/organizations/default", "user"),
    Route("capabilities", "GET", "/api/capabilities", "user"),
    Route("templates", "GET", "/api/registry/templates", "user"),
    Route("packages", "GET", "/api/registry/packages", "user"),
    Route(
        "list_stacks",
        "GET",
        "/api/user/stacks",
        "user",
        queries=("organization", "project", "tagName", "tagValue", "continuationToken"),
    ),
    Route("project_exists", "HEAD", "/api/stacks/{org}/{project}", "user"),
    Route("create_stack", "POST", "/api/stacks/{org}/{project}", "user", has_body=True),
    Route("get_stack", "GET", BASE, "user"),
    Route("delete_stack", "DELETE", BASE, "user", queries=("force",)),
    Route("rename", "POST", BASE + "/rename", "user", has_body=True),
    Route("tags", "PATCH", BASE + "/tags", "user", has_body=True),
    Route("export", "GET", BASE + "/export", "user", target="B"),
    Route("export_version", "GET", BASE + "/export/{version}", "user"),
    Route("import", "POST", BASE + "/import", "user", has_body=True),
    Route("history", "GET", BASE + "/updates", "user", queries=("page", "pageSize")),
    Route("latest", "GET", BASE + "/updates/latest", "user"),
    Route("encrypt", "POST", BASE + "/encrypt", "user", has_body=True),
    Route("decrypt", "POST", BASE + "/decrypt", "user", has_body=True),
    Route("batch_encrypt", "POST", BASE + "/batch-encrypt", "user", has_body=True),
    Route("batch_decrypt", "POST", BASE + "/batch-decrypt", "user", has_body=True),
    Route("log_decryption", "POST", BASE + "/decrypt/log-decryption", "user", has_body=True),
    Route(
        "log_batch_decryption",
        "POST",
        BASE + "/decrypt/log-batch-decryption",
        "user",
        has_body=True,
    ),
    Route("create_update", "POST", BASE + "/{kind}", "user", has_body=True),
    Route("start_update", "POST", UPDATE, "user", has_body=True, target="N"),
    Route("update_status", "GET", UPDATE, "user", target="U1"),
    Route("renew_lease", "POST", UPDATE + "/renew_lease", "update", has_body=True, target="U1"),
    Route("checkpoint", "PATCH", UPDATE + "/checkpoint", "update", has_body=True, target="U2"),
    Route(
        "checkpoint_verbatim",
        "PATCH",
        UPDATE + "/checkpointverbatim",
        "update",
        has_body=True,
        target="U2",
    ),
    Route(
        "checkpoint_delta",
        "PATCH",
        UPDATE + "/checkpointdelta",
        "update",
        has_body=True,
        target="U2",
    ),
    Route(
        "journal_entries",
        "PATCH",
        UPDATE + "/journalentries",
        "update",
        has_body=True,
        target="U1",
    ),
    Route("events_batch", "POST", UPDATE + "/events/batch", "update", has_body=True, target="U1"),
    Route("event", "POST", UPDATE + "/events", "update", has_body=True, target="U2"),
    Route(
        "get_events",
        "GET",
        UPDATE + "/events",
        "user",
        queries=("continuationToken", "urn"),
        target="U1",
    ),
    Route("complete", "POST", UPDATE + "/complete", "update", has_body=True, target="U2"),
    Route("cancel", "POST", UPDATE + "/cancel", "user", target="U1"),
    # Teams and site administration (issues 15 and 17): no stack or update of their own.
    Route("my_tokens", "GET", "/api/user/tokens", "user"),
    Route("create_token", "POST", "/api/user/tokens", "user", has_body=True),
    Route("all_tokens", "GET", "/api/admin/tokens", "user"),
    Route("members", "GET", "/api/orgs/{org}/members", "user"),
    Route("teams", "GET", "/api/orgs/{org}/teams", "user"),
    Route("roles", "GET", "/api/orgs/{org}/roles", "user"),
    Route("org_audit_logs", "GET", "/api/orgs/{org}/auditlogs", "user", queries=AUDIT_QUERIES),
    Route("site_audit_logs", "GET", "/api/admin/auditlogs", "user", queries=AUDIT_QUERIES),
    Route("list_backups", "GET", "/api/admin/backups", "user"),
    Route("take_backup", "POST", "/api/admin/backups", "user"),
    Route("keys", "GET", "/api/admin/keys", "user"),
    Route("rotate_keys", "POST", "/api/admin/keys/rotate", "user"),
)
ROUTE = {route.name: route for route in ROUTES}
BODY_ROUTES = tuple(r for r in ROUTES if r.has_body)
UPDATE_TOKEN_ROUTES = tuple(r for r in ROUTES if r.auth == "update")
# A request of these that is accepted ends or moves what the campaign aims at.
DESTRUCTIVE = frozenset({"delete_stack", "rename", "start_update", "complete", "cancel"})

STACK_TARGETS = ("A", "B", "C", "missing")
# U1: journaling update on A; U3: a preview on A; U2: a checkpointing update on B;
# N: a created, not started update on C; the rest name updates that do not fit the path.
UPDATE_TARGETS = ("U1", "U2", "U3", "N", "U1@B", "unknown", "U1@missing")

# -- credentials ----------------------------------------------------------------------------

# Symbolic Authorization headers; test_hostile.py fills in tokens. "update-own" is the token
# of the update the path names, "update-other" the one of a *different* running update.
AUTH_KINDS = (
    "user",
    "user-upper-scheme",
    "none",
    "user-wrong",
    "user-empty",
    "user-bearer",
    "user-basic",
    "user-long",
    "user-non-ascii",
    "user-with-update-token",
    "update-with-user-token",
    "update-own",
    "update-other",
    "update-preview",
    "update-finished",
    "update-wrong",
    "update-empty",
    "update-long",
)
UPDATE_TOKEN_KINDS = ("update-own", "update-other", "update-preview", "update-finished")

# -- paths ----------------------------------------------------------------------------------

ODD_SEGMENTS = {
    "dotdot": "..",
    "dot": ".",
    "encoded-dotdot": "%2E%2E",
    "encoded-slash": "%2F",
    "traversal": "..%2F..%2Fetc%2Fpasswd",
    "backslash": "..%5C..%5C",
    "empty": "",
    "long": "n" * 8000,
    "unicode": "%C3%A9t%C3%A9",
    "emoji": "%F0%9F%92%A5",
    "right-to-left": "%E2%80%AEabc",
    "nul": "%00",
    "newline": "a%0D%0Ab",
    "space": "a%20b",
    "percent": "%25",
    "invalid-utf8": "%FF",
    "overlong-utf8": "%C0%AF",
    "question": "a%3Fb%3D1",
    "hash": "a%23b",
    "digits": "0",
    "negative": "-1",
    "huge-number": str(10**30),
}


@dataclass(frozen=True)
class PathTwist:
    placeholder: str
    label: str
    segment: str


QUERY_VALUES = {
    "empty": "",
    "negative": "-1",
    "zero": "0",
    "huge": str(10**20),
    "2**64": str(2**64),
    "float": "1.5",
    "nan": "NaN",
    "1e400": "1e400",
    "hex": "0x10",
    "superscript": "%C2%B2",
    "invalid-utf8": "%FF",
    "text": "yes",
    "true": "true",
    "long": "q" * 5000,
}


@dataclass(frozen=True)
class QueryTwist:
    label: str
    query: str  # without the "?"


# -- bodies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyContext:
    """What a valid body needs from the world it is sent to."""

    project: str = "web"
    fresh_name: str = "fresh"
    ciphertext: str = ""
    event_sequence: int = 1
    journal_sequence: int = 1
    checkpoint_sequence: int = 2
    baseline: bytes = b""


def resource(name: str, n: int) -> dict[str, Any]:
    return {
        "urn": f"urn:pulumi:dev::web::test:index:Thing::{name}",
        "custom": True,
        "type": "test:index:Thing",
        "id": f"id-{name}",
        "inputs": {"n": n, "s": "in"},
        "outputs": {"n": n, "s": "out"},
    }


def deployment_doc(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "", "version": ""},
        "resources": resources,
    }


def untyped(resources: list[dict[str, Any]], version: int = 3) -> dict[str, Any]:
    return {"version": version, "deployment": deployment_doc(resources)}


def delta_body(baseline: bytes, new_text: str, sequence: int) -> dict[str, Any]:
    """A delta replacing the whole baseline; valid exactly when baseline is the daemon's."""
    return {
        "version": 1,
        "checkpointHash": hashlib.sha256(new_text.encode("utf-8", "surrogatepass")).hexdigest(),
        "sequenceNumber": sequence,
        "deploymentDelta": [
            {
                "Span": {
                    "uri": "",
                    "start": {"line": 1, "column": 1, "offset": 0},
                    "end": {"line": 1, "column": 1, "offset": len(baseline)},
                },
                "NewText": new_text,
            }
        ],
    }


def valid_body(route: str, ctx: BodyContext) -> Any:
    """A body the route accepts (from the right credentials and target); None: no body."""
    seq = ctx.event_sequence
    if route == "create_stack":
        return {
            "stackName": ctx.fresh_name,
            "tags": {"team": "blue"},
            "state": untyped([resource("seed", 1)]),
        }
    if route == "rename":
        return {"newName": ctx.fresh_name}
    if route == "tags":
        return {"team": "blue", "pulumi:project": ctx.project}
    if route == "import":
        return untyped([resource("imported-a", 1), resource("imported-b", 2)])
    if route == "encrypt":
        return {"plaintext": b64(b"hunter2")}
    if route == "decrypt":
        return {"ciphertext": ctx.ciphertext}
    if route == "batch_encrypt":
        return {"plaintexts": [b64(b"a"), b64(b"")]}
    if route == "batch_decrypt":
        return {"ciphertexts": [ctx.ciphertext]}
    if route in ("log_decryption", "log_batch_decryption"):
        return {}
    if route == "create_update":
        return {
            "name": ctx.project,
            "runtime": "yaml",
            "main": "",
            "description": "",
            "options": {"dryRun": False},
            "config": {"web:size": {"string": "3", "secret": False, "object": False}},
            "metadata": {"message": "hostile", "environment": {"exec.kind": "cli"}},
        }
    if route == "start_update":
        return {"tags": {"pulumi:project": ctx.project}, "journalVersion": 1}
    if route == "renew_lease":
        return {"token": "", "duration": 300}
    if route == "checkpoint":
        return {
            "isInvalid": False,
            "version": 3,
            "deployment": deployment_doc([resource("checkpointed", ctx.checkpoint_sequence)]),
        }
    if route == "checkpoint_verbatim":
        return {
            "version": 1,
            "untypedDeployment": untyped([resource("verbatim", ctx.checkpoint_sequence)]),
            "sequenceNumber": ctx.checkpoint_sequence,
        }
    if route == "checkpoint_delta":
        text = dumps(untyped([resource("delta", ctx.checkpoint_sequence)]))
        return delta_body(ctx.baseline, text, ctx.checkpoint_sequence)
    if route == "journal_entries":
        s = ctx.journal_sequence
        res = resource(f"journal-{s}", s)
        return {
            "entries": [
                {
                    "version": 1,
                    "kind": 0,
                    "sequenceID": s,
                    "operationID": s,
                    "operation": {"resource": res, "type": "creating"},
                },
                {"version": 1, "kind": 1, "sequenceID": s + 1, "operationID": s, "state": res},
            ]
        }
    if route == "events_batch":
        return {
            "events": [
                {
                    "sequence": seq,
                    "timestamp": 1_700_000_000,
                    "stdoutEvent": {"message": "hi", "color": "raw"},
                },
                {
                    "sequence": seq + 1,
                    "timestamp": 1_700_000_001,
                    "summaryEvent": {"resourceChanges": {"create": 1}, "result": "succeeded"},
                },
            ]
        }
    if route == "event":
        return {
            "sequence": seq,
            "timestamp": 1_700_000_000,
            "diagnosticEvent": {"message": "note", "color": "raw", "severity": "info"},
        }
    if route == "complete":
        return {"status": "succeeded"}
    if route == "create_token":
        return {"description": "ci", "expires": 0}
    return None


Path = tuple[str | int, ...]


def node_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every member and element below the top, parents before children."""
    paths: list[Path] = []
    if isinstance(value, dict):
        for key, child in value.items():
            paths.append((*prefix, key))
            paths.extend(node_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths.append((*prefix, index))
            paths.extend(node_paths(child, (*prefix, index)))
    return paths


@cache
def body_paths(route: str) -> tuple[Path, ...]:
    return tuple(node_paths(valid_body(route, BodyContext(ciphertext="x", baseline=b"{}"))))


# Fields where numbers and strings matter most (sequences, versions, names, state values).
NUMBER_FIELDS: dict[str, tuple[Path, ...]] = {
    "create_stack": (("state", "version"), ("state", "deployment", "resources", 0, "outputs", "n")),
    "import": (("version",), ("deployment", "resources", 0, "outputs", "n")),
    "checkpoint": (("version",), ("deployment", "resources", 0, "outputs", "n")),
    "checkpoint_verbatim": (
        ("sequenceNumber",),
        ("untypedDeployment", "version"),
        ("untypedDeployment", "deployment", "resources", 0, "outputs", "n"),
    ),
    "checkpoint_delta": (("sequenceNumber",), ("version",)),
    "journal_entries": (
        ("entries", 0, "sequenceID"),
        ("entries", 0, "operationID"),
        ("entries", 1, "state", "outputs", "n"),
    ),
    "events_batch": (("events", 0, "sequence"), ("events", 1, "timestamp")),
    "event": (("sequence",),),
    "renew_lease": (("duration",),),
    "start_update": (("journalVersion",),),
    "create_update": (("options", "dryRun"),),
    "encrypt": (("plaintext",),),
    "batch_decrypt": (("ciphertexts", 0),),
    "create_token": (("expires",),),
}
STRING_FIELDS: dict[str, tuple[Path, ...]] = {
    "create_stack": (("stackName",), ("tags", "team")),
    "rename": (("newName",),),
    "tags": (("team",),),
    "import": (("deployment", "resources", 0, "outputs", "s"),),
    "checkpoint": (("deployment", "resources", 0, "urn"),),
    "checkpoint_verbatim": (("untypedDeployment", "deployment", "resources", 0, "outputs", "s"),),
    "journal_entries": (("entries", 1, "state", "outputs", "s"),),
    "events_batch": (("events", 0, "stdoutEvent", "message"),),
    "create_update": (("metadata", "message"),),
    "complete": (("status",),),
    "decrypt": (("ciphertext",),),
    "encrypt": (("plaintext",),),
    "create_token": (("description",),),
}


@dataclass(frozen=True)
class Mutation:
    """How to spoil the valid body of a route."""

    kind: str
    label: str
    path: Path | None = None
    value: Any = None

    def describe(self) -> str:
        where = "/".join(str(p) for p in self.path) if self.path else ""
        return f"{self.label}@{where}" if where else self.label


VALID = Mutation("valid", "valid")

# Whole-body replacements that do not depend on the route.
MALFORMED = {
    "truncated": b'{"stackName": "x',
    "single-quotes": b"{'a': 1}",
    "bare-word": b"nope",
    "binary": bytes(range(256)),
    "nul-bytes": b"\x00" * 64,
    "trailing-comma": b'{"a": 1,}',
    "comment": b'{"a": 1 /* no */}',
    "unquoted-key": b"{a: 1}",
    "hex-number": b'{"a": 0x10}',
    "leading-zero": b'{"a": 01}',
    "plus-number": b'{"a": +1}',
    "utf16": '{"a": 1}'.encode("utf-16"),
    "only-bom": b"\xef\xbb\xbf",
    "whitespace": b" \t\r\n ",
}
NOT_OBJECTS = {"array": [1], "string": "x", "number": 1, "null": None, "true": True}


def mutation_groups(route: str) -> dict[str, list[Mutation]]:
    """Every fixed body spoiler for one route, by kind of spoiling."""
    groups: dict[str, list[Mutation]] = {
        "empty": [Mutation("empty", "empty-body")],
        "gzip-valid": [Mutation("gzip", "gzip-valid")],
        "bom": [Mutation("bom", "bom")],
        "deep": [Mutation("deep", "deep-nesting")],
        "gzip-bomb": [Mutation("gzip-bomb", "gzip-bomb")],
        "invalid-utf8": [Mutation("invalid-utf8", "invalid-utf8")],
        "oversize": [
            Mutation("oversize", "oversized"),
            Mutation("oversize-chunked", "oversized-chunked"),
        ],
        "trailing": [
            Mutation("trailing", "trailing-garbage", value=b" x"),
            Mutation("trailing", "trailing-object", value=b"{}"),
            Mutation("trailing", "trailing-nul", value=b"\x00"),
        ],
        "gzip-broken": [
            Mutation("raw", "gzip-garbage", value=b"\x1f\x8b\x08\x00garbage"),
            Mutation("gzip-truncated", "gzip-truncated"),
        ],
        "encoding": [
            Mutation("encoding", "encoding-br", value="br"),
            Mutation("encoding", "encoding-deflate", value="deflate"),
            Mutation("encoding", "encoding-double-gzip", value="gzip, gzip"),
            Mutation("encoding", "encoding-unknown", value="x-hostile"),
        ],
        "malformed": [Mutation("raw", f"malformed-{k}", value=v) for k, v in MALFORMED.items()],
        "not-object": [
            Mutation("whole", f"not-object-{k}", value=v) for k, v in NOT_OBJECTS.items()
        ],
    }
    paths = body_paths(route)
    if paths:
        # Deep nesting inside the envelope too: the parsers that slice members go there.
        deepest_container = max(
            (p for p in paths if isinstance(_get(valid_body(route, _DUMMY), p), dict | list)),
            key=len,
            default=paths[0],
        )
        groups["deep-inside"] = [
            Mutation("replace", "deep-nesting-inside", paths[0], Deep()),
            Mutation("replace", "deep-nesting-inside", deepest_container, Deep()),
        ]
        groups["structure"] = [
            Mutation("duplicate-last", "duplicate-key-hostile-last", paths[0], "dup"),
            Mutation("duplicate-first", "duplicate-key-hostile-first", paths[0], "dup"),
            Mutation("drop", "missing-field", paths[0]),
        ]
        groups["wrong-type"] = [
            Mutation("replace", f"wrong-type-{label}", path, value)
            for path in paths
            if len(path) == 1
            for label, value in (("null", None), ("list", [0]), ("float", 1.5))
        ]
    groups["numbers"] = [
        Mutation("replace", label, path, raw)
        for path in NUMBER_FIELDS.get(route, ())
        for label, raw in {**NON_FINITE, **BIG_INTS}.items()
    ]
    groups["strings"] = [
        mutation
        for path in STRING_FIELDS.get(route, ())
        for mutation in (
            *(Mutation("replace", label, path, raw) for label, raw in SURROGATES.items()),
            Mutation("replace", "long-string", path, "s" * 200_000),
            Mutation("replace", "nul-in-string", path, "a\x00b"),
        )
    ]
    if route == "checkpoint_delta":
        groups["delta"] = [
            Mutation("delta-text", label, None, text) for label, text in DELTA_TEXTS.items()
        ]
    return {name: group for name, group in groups.items() if group}


# How many of each group one route gets in the sweep (rotating over the routes, so that
# every variant is sent to several routes); groups not listed are sent whole.
SWEEP_ROTATION = {
    "oversize": 1,
    "trailing": 1,
    "gzip-broken": 1,
    "encoding": 1,
    "malformed": 2,
    "not-object": 1,
    "deep-inside": 1,
    "wrong-type": 2,
    "numbers": 5,
    "strings": 3,
}


def fixed_mutations(route: str) -> list[Mutation]:
    return [m for group in mutation_groups(route).values() for m in group]


def rotate(items: list[Any], count: int, seed: int) -> list[Any]:
    if count >= len(items):
        return list(items)
    return [items[(seed * count + i) % len(items)] for i in range(count)]


def sweep_mutations(route: str, seed: int) -> list[Mutation]:
    out: list[Mutation] = []
    for name, group in mutation_groups(route).items():
        out += rotate(group, SWEEP_ROTATION.get(name, len(group)), seed)
    return out


# Delta results whose hash is right but whose text is not a state a CLI can read back.
DELTA_TEXTS = {
    "delta-to-nan": '{"version":3,"deployment":{"manifest":{},"resources":[{"n":NaN}]}}',
    "delta-to-1e400": '{"version":3,"deployment":{"manifest":{},"resources":[{"n":1e400}]}}',
    "delta-to-surrogate": (
        '{"version":3,"deployment":{"manifest":{},"resources":[{"s":"\\ud800"}]}}'
    ),
    "delta-to-garbage": "not json at all",
    "delta-to-array": "[1, 2, 3]",
    "delta-to-deep": "[" * NESTING + "]" * NESTING,
}

_DUMMY = BodyContext(ciphertext="x", baseline=b"{}")


def _get(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


def _set(value: Any, path: Path, new: Any) -> Any:
    """A copy of value with the node at path replaced by new."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        copy[head] = _set(value[head], rest, new)
        return copy
    assert isinstance(head, int), path
    items = list(value)
    items[head] = _set(items[head], rest, new)
    return items


def _drop(value: Any, path: Path) -> Any:
    parent = _get(value, path[:-1])
    key = path[-1]
    if isinstance(parent, dict):
        new_parent: Any = {k: v for k, v in parent.items() if k != key}
    else:
        new_parent = [v for i, v in enumerate(parent) if i != key]
    return _set(value, path[:-1], new_parent)


def _duplicate(value: Any, path: Path, hostile_last: bool, hostile: Any) -> Any:
    parent = _get(value, path[:-1])
    key = path[-1]
    if not isinstance(parent, dict):
        return _set(value, path, hostile)
    pairs: list[tuple[str, Any]] = []
    for k, v in parent.items():
        if k == key:
            pairs += [(k, v), (k, hostile)] if hostile_last else [(k, hostile), (k, v)]
        else:
            pairs.append((k, v))
    return _set(value, path[:-1], Dup(tuple(pairs)))


@dataclass(frozen=True)
class Body:
    """Bytes to send (None: no body) and what to say about them."""

    data: bytes | None
    headers: tuple[tuple[str, str], ...] = ()
    chunked: bool = False


def spoil(route: str, valid: Any, mutation: Mutation, ctx: BodyContext) -> Body:
    """Apply a mutation to the valid body of a route."""
    kind = mutation.kind
    if kind == "valid":
        return Body(None if valid is None else encode(valid))
    if kind == "gzip":
        return Body(
            zlib_gzip(encode(valid if valid is not None else {})), (("Content-Encoding", "gzip"),)
        )
    if kind == "empty":
        return Body(b"")
    if kind == "raw":
        return Body(mutation.value)
    if kind == "whole":
        return Body(encode(mutation.value))
    base = valid if valid is not None else {}
    if kind == "bom":
        return Body(b"\xef\xbb\xbf" + encode(base))
    if kind == "trailing":
        return Body(encode(base) + mutation.value)
    if kind == "deep":
        return Body(encode(Deep()))
    if kind == "oversize":
        return Body(oversized(base))
    if kind == "oversize-chunked":
        return Body(oversized(base), chunked=True)
    if kind == "gzip-bomb":
        return Body(gzip_bomb(), (("Content-Encoding", "gzip"),))
    if kind == "gzip-truncated":
        return Body(zlib_gzip(encode(base))[:-12], (("Content-Encoding", "gzip"),))
    if kind == "encoding":
        return Body(encode(base), (("Content-Encoding", mutation.value),))
    if kind == "invalid-utf8":
        paths = [p for p in body_paths(route) if isinstance(_get(base, p), str)]
        spoiled = _set(base, paths[0], BAD_UTF8_MARK) if paths else {"k": BAD_UTF8_MARK}
        return Body(encode(spoiled))
    if kind == "delta-text":
        return Body(encode(delta_body(ctx.baseline, mutation.value, ctx.checkpoint_sequence)))
    assert mutation.path is not None, mutation
    if kind == "replace":
        spoiled = _set(base, mutation.path, mutation.value)
        if route == "checkpoint_delta" and mutation.path[:3] == ("deploymentDelta", 0, "NewText"):
            new_text = spoiled["deploymentDelta"][0]["NewText"]
            if isinstance(new_text, str):  # keep the hash right: the content is what is tested
                spoiled["checkpointHash"] = hashlib.sha256(
                    new_text.encode("utf-8", "surrogatepass")
                ).hexdigest()
        return Body(encode(spoiled))
    if kind == "drop":
        return Body(encode(_drop(base, mutation.path)))
    if kind in ("duplicate-last", "duplicate-first"):
        hostile = mutation.value
        if hostile == "dup":
            hostile = _get(base, mutation.path)
            hostile = "dup" if not isinstance(hostile, str) else hostile + "-dup"
        return Body(encode(_duplicate(base, mutation.path, kind == "duplicate-last", hostile)))
    raise AssertionError(f"unknown mutation {mutation}")


def zlib_gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


@cache
def gzip_bomb() -> bytes:
    """100 MB of zeros, gzip-compressed to about 100 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    parts = [compressor.compress(chunk) for _ in range(BOMB_SIZE // MIB)]
    parts.append(compressor.compress(bytes(BOMB_SIZE % MIB)))
    parts.append(compressor.flush())
    return b"".join(parts)


def oversized(valid: Any) -> bytes:
    """Well-formed JSON a few MB over the limit: the valid body plus a long member."""
    padding = "p" * OVERSIZE
    if isinstance(valid, dict):
        return encode({**valid, "padding": padding})
    return encode({"padding": padding})


# -- hypothesis strategies ------------------------------------------------------------------

json_leaves: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**20]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(list(NON_STANDARD.values())),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=6), children, max_size=3),
    ),
    max_leaves=6,
)


def random_mutations(route: str) -> st.SearchStrategy[Mutation]:
    """Fixed spoilers, or a random node of the valid body replaced, dropped or duplicated."""
    fixed = st.sampled_from(fixed_mutations(route))
    paths = body_paths(route)
    if not paths:
        return fixed
    path = st.sampled_from(paths)
    replaced = st.builds(lambda p, v: Mutation("replace", "random-value", p, v), path, json_values)
    typed = st.builds(
        lambda p, item: Mutation("replace", f"wrong-type-{item[0]}", p, item[1]),
        path,
        st.sampled_from(sorted(WRONG_TYPES.items())),
    )
    standard = st.builds(
        lambda p, item: Mutation("replace", item[0], p, item[1]),
        path,
        st.sampled_from(sorted(NON_STANDARD.items())),
    )
    dropped = st.builds(lambda p: Mutation("drop", "missing-field", p), path)
    duplicated = st.builds(
        lambda p, last, v: Mutation(
            "duplicate-last" if last else "duplicate-first", "duplicate-key", p, v
        ),
        path,
        st.booleans(),
        json_values,
    )
    return st.one_of(fixed, replaced, typed, standard, dropped, duplicated)


@dataclass(frozen=True)
class ProbeSpec:
    """One hostile request, symbolically."""

    route: Route
    target: str
    auth: str
    mutation: Mutation = VALID
    path_twist: PathTwist | None = None
    query_twist: QueryTwist | None = None
    kind: str = "update"

    def describe(self) -> str:
        parts = [self.route.name, f"target={self.target}", f"auth={self.auth}"]
        if self.route.has_body or self.mutation is not VALID:
            parts.append(f"body={self.mutation.describe()}")
        if self.path_twist:
            parts.append(f"path:{self.path_twist.placeholder}={self.path_twist.label}")
        if self.query_twist:
            parts.append(f"query={self.query_twist.label}")
        if self.kind != "update":
            parts.append(f"kind={self.kind}")
        return " ".join(parts)


def targets_for(route: Route) -> tuple[str, ...]:
    if route.is_update_route:
        return UPDATE_TARGETS
    if "{stack}" in route.template:
        return STACK_TARGETS
    return ("C",)


def path_twists(route: Route) -> st.SearchStrategy[PathTwist | None]:
    if not route.placeholders:
        return st.none()
    return st.one_of(
        st.none(),
        st.builds(
            lambda p, item: PathTwist(p, item[0], item[1]),
            st.sampled_from(route.placeholders),
            st.sampled_from(sorted(ODD_SEGMENTS.items())),
        ),
    )


def query_twists(route: Route) -> st.SearchStrategy[QueryTwist | None]:
    if not route.queries:
        return st.none()
    return st.one_of(
        st.none(),
        st.builds(
            lambda key, item: QueryTwist(f"{key}={item[0]}", f"{key}={item[1]}"),
            st.sampled_from(route.queries),
            st.sampled_from(sorted(QUERY_VALUES.items())),
        ),
    )


@st.composite
def probe_specs(
    draw: st.DrawFn,
    *,
    routes: tuple[Route, ...] = ROUTES,
    auths: tuple[str, ...] | None = None,
    mutate: bool = True,
    twist_paths: bool = True,
) -> ProbeSpec:
    """A route, a target, credentials, and (optionally) a spoiled body and odd path."""
    route = draw(st.sampled_from(routes))
    natural = route.target if route.is_update_route or "{stack}" in route.template else "C"
    target = draw(st.one_of(st.just(natural), st.sampled_from(targets_for(route))))
    correct = correct_auth(route)
    if auths is None:
        auths = AUTH_KINDS
    auth = draw(st.one_of(st.just(correct), st.sampled_from(auths))) if auths else correct
    mutation = VALID
    if mutate and route.has_body:
        mutation = draw(st.one_of(st.just(VALID), random_mutations(route.name)))
    twist = draw(path_twists(route)) if twist_paths else None
    query = draw(query_twists(route))
    kind = "update"
    if "{kind}" in route.template:
        kind = draw(st.sampled_from(["update", "update", "preview", "refresh", "destroy"]))
    return ProbeSpec(route, target, auth, mutation, twist, query, kind)


def correct_auth(route: Route) -> str:
    return "update-own" if route.auth == "update" else "user"


def sweep_specs() -> list[ProbeSpec]:
    """The deterministic part of the campaign.

    Every route gets the right credentials, none, wrong ones and another running update's
    token, plus three more kinds in rotation; every update-token route gets the tokens of
    every other update; every body route gets every kind of spoiled body (variants in
    rotation); every placeholder every odd segment; every query parameter odd values."""
    specs: list[ProbeSpec] = []
    for seed, route in enumerate(ROUTES):
        wrong = "update-wrong" if route.auth == "update" else "user-wrong"
        required = [correct_auth(route), "none", wrong, "update-other"]
        others = [a for a in AUTH_KINDS if a not in required]
        for auth in required + rotate(others, 3, seed):
            specs.append(ProbeSpec(route, route.target, auth))
    for route in UPDATE_TOKEN_ROUTES:
        for target in ("U1", "U2", "U3"):
            for auth in ("update-other", "update-preview", "update-finished"):
                if not (target == "U3" and auth == "update-preview"):
                    specs.append(ProbeSpec(route, target, auth))
    for seed, route in enumerate(BODY_ROUTES):
        for mutation in sweep_mutations(route.name, seed):
            specs.append(ProbeSpec(route, route.target, correct_auth(route), mutation))
    bodiless = [r for r in ROUTES if not r.has_body]
    spoilers = [
        Mutation("oversize", "oversized"),
        Mutation("gzip-bomb", "gzip-bomb"),
        Mutation("deep", "deep-nesting"),
        Mutation("raw", "malformed-truncated", value=MALFORMED["truncated"]),
    ]
    for seed, route in enumerate(bodiless):
        for mutation in rotate(spoilers, 2, seed):
            specs.append(ProbeSpec(route, route.target, correct_auth(route), mutation))
    twisted = [r for r in ROUTES if r.placeholders]
    for index, (label, segment) in enumerate(sorted(ODD_SEGMENTS.items())):
        for placeholder in ("org", "project", "stack", "kind", "update", "version"):
            candidates = [r for r in twisted if placeholder in r.placeholders]
            route = candidates[index % len(candidates)]
            twist = PathTwist(placeholder, label, segment)
            specs.append(ProbeSpec(route, route.target, correct_auth(route), path_twist=twist))
    seed = 0
    for route in ROUTES:
        for key in route.queries:
            for label, value in rotate(sorted(QUERY_VALUES.items()), 5, seed):
                query = QueryTwist(f"{key}={label}", f"{key}={value}")
                specs.append(ProbeSpec(route, route.target, "user", query_twist=query))
            seed += 1
    return specs


def with_target(spec: ProbeSpec, target: str) -> ProbeSpec:
    return replace(spec, target=target)
