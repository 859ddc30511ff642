"""`pulumid-admin port` against the real engines: a SQLite database built by driving the real
Backend, ported to PostgreSQL (with blobs inline or in MinIO) and back, verified, corrupted,
refused; and a real daemon serving the ported database over HTTP."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from twisted.internet.task import Clock

from pulumid.admin.__main__ import main
from pulumid.admin.databases import TABLES
from pulumid.config import Config
from pulumid.engine import deployments
from pulumid.engine.backend import Backend
from pulumid.engine.events import EventWriter
from pulumid.engine.inflight import InFlight
from pulumid.engine.secrets import StackSecrets
from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import Keyring, LocalKey
from pulumid.storage.blobs import S3Blobs
from pulumid.storage.interface import Store
from pulumid.storage.postgres import PostgresStore
from pulumid.storage.records import AuditRecord, IdentityRecord, StackRef, TokenRecord
from pulumid.storage.rows import BLOB_COLUMNS
from pulumid.storage.split import REF
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner
from tests.e2e.helpers import Daemon, wait_until
from tests.engine.test_backend import _sync, deployment_body, ok
from tests.engine.test_inflight import delta, journal_batch, verbatim
from tests.minio import s3_url
from tests.postgres import PostgresServer

MASTER_KEY = "5e" * 32
START = 1_700_000_000.0
ORG = "acme"
# Stacks with an update left running in the source built with running=True.
RUNNING = ("acme/web/deltas", "acme/api/jobs")


# -- a realistic source database ----------------------------------------------------------


@dataclass
class Exported:
    current: Any  # the document export answers now
    versions: dict[int, bytes] = field(default_factory=dict)  # every stored state, gunzipped


@dataclass
class Access:
    """Identities, access tokens and the audit trail (every org's), as the store lists them."""

    identities: list[IdentityRecord]
    tokens: list[TokenRecord]
    audit: dict[str, list[AuditRecord]]
    audit_floor: int  # the newest audit event, deleted: its id must not be handed out again


@dataclass
class Source:
    path: Path
    exports: dict[str, Exported]
    ciphertext: bytes  # "hunter2" under site/prod's secrets key
    deleted_id: int  # the last stack, deleted: its id must not be handed out again
    # When the exports were taken: a running journal's replay stamps its manifest with it.
    exported_at: float
    access: Access


def _backend(path: Path, now: float = START) -> tuple[Backend, SQLiteStore, Clock]:
    config = Config(database=str(path), token="test-token-123", organization=ORG, user="alice")
    store = SQLiteStore.open(path, InlineRunner())
    clock = Clock()
    clock.advance(now)
    cpu = InlineRunner()
    secrets = StackSecrets(store, Keyring(LocalKey(MasterKey.from_hex(MASTER_KEY))), cpu)
    ok(secrets.check_keys())  # the canary a daemon checks its key against
    inflight = InFlight(store, cpu, clock, config.max_body_size)
    backend = Backend(config, store, clock, cpu, secrets, EventWriter(store), inflight)
    return backend, store, clock


def _resources(project: str, count: int) -> list[dict[str, Any]]:
    stack = f"urn:pulumi:dev::{project}::pulumi:pulumi:Stack::{project}-dev"
    pets = [
        {
            "urn": f"urn:pulumi:dev::{project}::random:index/randomPet:RandomPet::pet{n}",
            "custom": True,
            "type": "random:index/randomPet:RandomPet",
            "id": f"pet-{n}",
            "parent": stack,
            "outputs": {"length": n, "id": f"pet-{n}"},
        }
        for n in range(count)
    ]
    return [{"urn": stack, "custom": False, "type": "pulumi:pulumi:Stack"}, *pets]


def _item(name: str) -> str:
    return f"urn:pulumi:dev::api::test:index:Item::{name}"


def _created(seq: int, op: int, urn: str) -> list[dict[str, Any]]:
    state = {"urn": urn, "custom": True, "type": "test:index:Item", "id": f"id{op}"}
    return [
        {"version": 1, "kind": 0, "sequenceID": seq, "operationID": op},
        {"version": 1, "kind": 1, "sequenceID": seq + 1, "operationID": op, "state": state},
    ]


def _entries(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"entries": list(entries)}).encode()


def build_source(path: Path, *, running: bool) -> Source:
    backend, store, clock = _backend(path)

    def create(project: str, name: str, **body: Any) -> StackRef:
        ok(backend.create_stack(ORG, project, {"stackName": name, **body}))
        return StackRef(ORG, project, name)

    def start(ref: StackRef, kind: str = "update", journal: bool = False) -> tuple[str, str]:
        body = {
            "options": {"dryRun": kind == "preview"},
            "name": ref.project,
            "runtime": "yaml",
            "config": {"aws:region": {"string": "eu-west-1", "secret": False}},
            "metadata": {"message": f"{kind} of {ref}", "environment": {"git.head": "abc"}},
        }
        update_id = ok(backend.create_update(ref, kind, body))
        started = ok(
            backend.start_update(ref, update_id, {"journalVersion": 1} if journal else {}, "3.259")
        )
        clock.advance(2)
        assert started.token
        return update_id, started.token

    def events(ref: StackRef, update_id: str, token: str, count: int) -> None:
        batch: list[dict[str, Any]] = [
            {"sequence": n, "timestamp": int(clock.seconds()), "diagnosticEvent": {"text": f"#{n}"}}
            for n in range(count)
        ]
        batch.append(
            {
                "sequence": count,
                "timestamp": int(clock.seconds()),
                "summaryEvent": {"resourceChanges": {"create": count, "same": 1}},
            }
        )
        ok(backend.post_events(ref, update_id, token, {"events": batch}))

    # web/dev: three real updates, a preview, a cancelled update and one never started.
    dev = create("web", "dev", tags={"env": "dev", "owner": "alice"})
    for n in range(1, 4):
        update_id, token = start(dev)
        ok(backend.checkpoint(dev, update_id, token, deployment_body(_resources("web", n))))
        events(dev, update_id, token, 3 + n)
        ok(backend.complete(dev, update_id, token, "succeeded"))
        clock.advance(60)
    update_id, token = start(dev, "preview")
    events(dev, update_id, token, 2)
    ok(backend.complete(dev, update_id, token, "succeeded"))
    update_id, token = start(dev)
    ok(backend.checkpoint(dev, update_id, token, deployment_body(_resources("web", 5))))
    ok(backend.cancel(dev, update_id))
    ok(backend.create_update(dev, "update", {"options": {}}))

    # web/staging: created with a state, a secret, an update, then renamed to site/prod.
    initial = json.loads(deployment_body(_resources("web", 1)))
    staging = create("web", "staging", tags={"env": "staging"}, state=initial)
    [ciphertext] = ok(backend.encrypt(staging, [b"hunter2"]))
    update_id, token = start(staging)
    ok(backend.checkpoint(staging, update_id, token, deployment_body(_resources("web", 2))))
    ok(backend.complete(staging, update_id, token, "succeeded"))
    ok(backend.rename_stack(staging, "site", "prod"))

    # web/deltas: an update that saved a delta checkpoint; another still running with one.
    deltas = create("web", "deltas")
    for last in (False, True):
        update_id, token = start(deltas)
        ok(backend.checkpoint_verbatim(deltas, update_id, token, verbatim(1)))
        ok(backend.checkpoint_delta(deltas, update_id, token, delta(2), delta(2)))
        events(deltas, update_id, token, 2)
        if not (last and running):
            ok(backend.complete(deltas, update_id, token, "succeeded"))

    # api/jobs: a journaling update; another still running with two journal batches.
    jobs = create("api", "jobs", tags={"team": "platform"})
    update_id, token = start(jobs, journal=True)
    body = journal_batch()
    ok(backend.journal_entries(jobs, update_id, token, body, body))
    ok(backend.complete(jobs, update_id, token, "succeeded"))
    update_id, token = start(jobs, journal=True)
    for batch in (_entries(*_created(1, 1, _item("a"))), _entries(*_created(3, 2, _item("b")))):
        ok(backend.journal_entries(jobs, update_id, token, batch, batch))
    events(jobs, update_id, token, 4)
    if not running:
        ok(backend.complete(jobs, update_id, token, "succeeded"))

    empty = create("api", "empty", tags={"empty": "yes"})
    assert empty
    imported = create("api", "imported")
    ok(backend.import_state(imported, deployment_body(_resources("api", 2))))

    # The newest stack is deleted: its id stays used.
    scratch = create("web", "scratch")
    deleted_id = ok(backend.stack(scratch)).id
    ok(backend.delete_stack(scratch, False))

    try:
        access = _add_access(store)
        exports = _exports(backend, store)
        return Source(path, exports, ciphertext, deleted_id, clock.seconds(), access)
    finally:
        store.close()


AUDIT_ORGS = (ORG, "other")


def _add_access(store: SQLiteStore) -> Access:
    """Two identities, three access tokens, an audit trail in two orgs whose newest event was
    deleted (its id stays used)."""
    done = _sync.successResultOf
    alice = IdentityRecord(
        "alice", "Alice", "alice@example.com", ("dev", "ops"), "oidc", START, START + 1.5
    )
    done(store.put_identity(replace(alice, refresh_token=b"\x00sealed")))
    bob = IdentityRecord("bob", "Bob", "bob@example.com", (), "jwt", START, START, disabled=True)
    done(store.put_identity(bob))
    day, hour = START + 86400, START + 3600.5
    for token in (
        TokenRecord("tok-pat", "h1", "alice", "personal", "laptop", START),
        TokenRecord("tok-cli", "h2", "alice", "cli", "pulumi login", START + 1, day, START + 2),
        TokenRecord("tok-x", "h3", "ci", "exchange", "", START + 2, hour, org=ORG, role="admin"),
    ):
        done(store.create_token(token))
    events = [
        AuditRecord(
            time=START + n,
            org=AUDIT_ORGS[n % 2],
            actor="alice",
            action="stack.update",
            resource=f"acme/web/dev#{n}",
            status=401 if n % 3 == 0 else 200,
            client_ip="192.0.2.7",
            description=f"event {n}",
            auth_failure=n % 3 == 0,
        )
        for n in range(6)
    ]
    done(store.add_audit_events(events))
    floor = store._conn.execute("SELECT MAX(id) FROM audit_events").fetchone()[0]
    store._conn.execute("DELETE FROM audit_events WHERE id = ?", (floor,))
    return Access(
        done(store.list_identities()), done(store.list_tokens(None)), _audit(store), floor
    )


def _audit(store: Store) -> dict[str, list[AuditRecord]]:
    return {
        org: _sync.successResultOf(store.list_audit_events(org, None, None, None, None, 0, 1000))
        for org in AUDIT_ORGS
    }


def same_access(store: Store, source: Source) -> None:
    """STORE holds the source's identities, tokens and audit trail, ids and all; a new audit
    event there gets an id never used on the source."""
    access = source.access
    assert _sync.successResultOf(store.list_identities()) == access.identities
    assert _sync.successResultOf(store.list_tokens(None)) == access.tokens
    assert _audit(store) == access.audit
    assert sum(map(len, access.audit.values())) == 5
    later = AuditRecord(START + 99, ORG, "carol", "token.create", "tok-new", 201, "::1")
    _sync.successResultOf(store.add_audit_events([later]))
    newest = _sync.successResultOf(store.list_audit_events(ORG, None, None, None, None, 0, 1))
    assert [e.id for e in newest] == [access.audit_floor + 1]


def _gunzip(data: bytes) -> bytes:
    return deployments.gunzip_blocking(data, 1 << 30)


def _exports(backend: Backend, store: SQLiteStore) -> dict[str, Exported]:
    found: dict[str, Exported] = {}
    for stack in _sync.successResultOf(store.list_stacks([ORG], None, None, None, None, 1000)):
        current = json.loads(_gunzip(ok(backend.export(stack.ref, None)).gzipped))
        exported = Exported(current)
        for version in range(stack.version + 1):
            state = _sync.successResultOf(store.get_state(stack.id, version))
            if state is not None:
                exported.versions[version] = _gunzip(state.gzipped)
        found[str(stack.ref)] = exported
    return found


def exports_of(path: Path, now: float) -> dict[str, Exported]:
    backend, store, _clock = _backend(path, now)
    try:
        return _exports(backend, store)
    finally:
        store.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A database with updates left running (journal batches and deltas in flight)."""
    return build_source(tmp_path_factory.mktemp("source") / "pulumid.sqlite", running=True)


@pytest.fixture(scope="module")
def quiet_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """The same history with every update ended."""
    return build_source(tmp_path_factory.mktemp("quiet") / "pulumid.sqlite", running=False)


# -- engines --------------------------------------------------------------------------------


@pytest.fixture
def new_database(postgres_server: PostgresServer) -> Callable[[], str]:
    """A factory of empty PostgreSQL databases, as postgresql:// URLs."""

    return lambda: postgres_server.create_database("port")


@pytest.fixture
def new_prefix(minio_endpoint: str) -> Callable[[], str]:
    """A factory of blob store URLs, each with a prefix of its own in MinIO."""
    return lambda: s3_url(minio_endpoint, "port-" + uuid.uuid4().hex[:12])


def pg_rows(url: str, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, tuple(args)).fetchall())


def port(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["port", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def ported(*args: str) -> str:
    code, out, err = port(*args)
    assert code == 0, f"port {args} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "the destination matches the source" in out, out
    return out


# -- the tests ------------------------------------------------------------------------------


def test_every_blob_column_of_the_store_is_ported_as_a_blob() -> None:
    assert {(t.name, t.blob) for t in TABLES if t.blob} == set(BLOB_COLUMNS)


def test_round_trip_through_postgres_and_s3_keeps_every_export(
    source: Source,
    new_database: Callable[[], str],
    new_prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    pg, blobs = new_database(), new_prefix()
    out = ported("--from", str(source.path), "--to", pg, "--to-blob-store", blobs,
                 "--allow-running")  # fmt: skip
    assert "porting 2 running update(s) as running" in out
    for table in ("stacks", "states", "updates", "events", "journal_batches"):
        assert f"  {table} " in out, out
    # The bulky bytes went to S3 under BlobbedStore's keys; the rows name them.
    refs = [
        bytes(row[0])
        for table, column in BLOB_COLUMNS
        for row in pg_rows(pg, f"SELECT {column} FROM {table}")
    ]
    assert len(refs) > 10 and all(r.startswith(REF) for r in refs)
    kinds = {r[len(REF) :].decode().split("/", 1)[0] for r in refs}
    assert kinds == {"states", "journal", "deltas"}
    store = S3Blobs.open(blobs, InlineRunner())
    try:
        keys = [k for kind in kinds for k in _sync.successResultOf(store.list_keys(kind + "/"))]
    finally:
        store.close()
    assert sorted(keys) == sorted(r[len(REF) :].decode() for r in refs)
    assert pg_rows(pg, "SELECT DISTINCT dry_run FROM updates ORDER BY 1") == [(False,), (True,)]

    # Without the source's object storage the blobs cannot be read: refused, nothing written.
    half = tmp_path / "half.sqlite"
    code, out, err = port("--from", pg, "--to", str(half), "--allow-running")
    assert code == 2 and "--from-blob-store" in err, out + err
    with closing(sqlite3.connect(half)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM stacks").fetchone() == (0,)
    code, out, err = port("--from", pg, "--to", str(half), "--verify-only")
    assert code == 1 and "only on the source" in out

    back = tmp_path / "back.sqlite"
    ported("--from", pg, "--from-blob-store", blobs, "--to", str(back), "--allow-running")
    final = exports_of(back, source.exported_at)
    assert final == source.exports
    assert set(final) == {
        "acme/web/dev", "acme/site/prod", "acme/web/deltas", "acme/api/jobs", "acme/api/empty",
        "acme/api/imported",
    }  # fmt: skip
    # The running journal's two batches replay the same on every side.
    urns = {r["urn"] for r in final["acme/api/jobs"].current["deployment"]["resources"]}
    assert {_item("a"), _item("b")} <= urns
    # Back inline, and the deleted stack's id is still never handed out again.
    final_store = SQLiteStore.open(back, InlineRunner())
    try:
        rows = final_store._conn.execute("SELECT data FROM states").fetchall()
        assert rows and not any(bytes(r[0]).startswith(REF) for r in rows)
        fresh = _sync.successResultOf(
            final_store.create_stack(StackRef(ORG, "web", "fresh"), {}, START, None)
        )
        assert fresh.id == source.deleted_id + 1
        same_access(final_store, source)
    finally:
        final_store.close()

    # A blob lost from the source's object storage stops the port midway: nothing committed.
    [(lost,)] = pg_rows(pg, "SELECT body FROM journal_batches ORDER BY batch DESC LIMIT 1")
    store = S3Blobs.open(blobs, InlineRunner())
    try:
        _sync.successResultOf(store.delete([bytes(lost)[len(REF) :].decode()]))
    finally:
        store.close()
    again = new_database()
    code, out, err = port("--from", pg, "--from-blob-store", blobs, "--to", again,
                          "--to-blob-store", new_prefix(), "--allow-running")  # fmt: skip
    assert code == 2, out + err
    assert "has lost blob" in err and "nothing was committed" in err, err
    assert pg_rows(again, "SELECT COUNT(*) FROM stacks") == [(0,)]


def test_sqlite_to_postgres_inline(quiet_source: Source, new_database: Callable[[], str]) -> None:
    pg = new_database()
    out = ported("--from", str(quiet_source.path), "--to", pg)
    assert "running" not in out
    data = [bytes(row[0]) for row in pg_rows(pg, "SELECT data FROM states")]
    assert data and all(d[:2] == b"\x1f\x8b" for d in data)  # gzip, inline
    # Verifying alone agrees, and the identity sequence continues past every used id.
    code, out, _err = port("--from", str(quiet_source.path), "--to", pg, "--verify-only")
    assert code == 0 and "matches" in out
    store = PostgresStore.open(pg, InlineRunner())
    try:
        fresh = _sync.successResultOf(
            store.create_stack(StackRef(ORG, "web", "fresh"), {}, START, None)
        )
        assert fresh.id == quiet_source.deleted_id + 1
        same_access(store, quiet_source)
    finally:
        store.close()


def test_a_corrupted_state_fails_verification_naming_stack_and_version(
    quiet_source: Source, new_database: Callable[[], str], postgres_server: PostgresServer
) -> None:
    pg = new_database()
    ported("--from", str(quiet_source.path), "--to", pg)
    [(stack_id, data)] = pg_rows(
        pg, "SELECT s.id, st.data FROM states st JOIN stacks s ON s.id = st.stack_id "
        "WHERE s.project = 'web' AND s.name = 'dev' AND st.version = 2",
    )  # fmt: skip
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0x01
    with psycopg.connect(pg) as conn:
        conn.execute(
            "UPDATE states SET data = %s WHERE stack_id = %s AND version = 2",
            (bytes(broken), stack_id),
        )
    # The libpq keyword form of the same database.
    name = pg.split("?")[0].rsplit("/", 1)[1]
    keywords = postgres_server.dsn.replace(f"dbname={postgres_server.database}", f"dbname={name}")
    code, out, _err = port("--from", str(quiet_source.path), "--to", keywords, "--verify-only")
    assert code == 1, out
    [line] = [line for line in out.splitlines() if "DIFFERENT" in line]
    assert "acme/web/dev" in line and "version 2" in line, line
    assert "1 DIFFERENCES" in out

    # A lost event and a changed tag are named too.
    [(update_id,)] = pg_rows(
        pg, "SELECT u.id FROM updates u JOIN stacks s ON s.id = u.stack_id WHERE s.name = 'jobs' "
        "AND u.status = 'succeeded' ORDER BY u.created DESC LIMIT 1",
    )  # fmt: skip
    with psycopg.connect(pg) as conn:
        conn.execute("DELETE FROM events WHERE update_id = %s AND seq = 0", (update_id,))
        conn.execute("UPDATE stack_tags SET value = 'ops' WHERE name = 'team'")
        # And a touched token, a lost audit event and a disabled identity.
        conn.execute("UPDATE access_tokens SET last_used = 1 WHERE id = 'tok-cli'")
        conn.execute("DELETE FROM audit_events WHERE id = 3")
        conn.execute("UPDATE identities SET disabled = TRUE WHERE login = 'alice'")
    code, out, _err = port("--from", str(quiet_source.path), "--to", pg, "--verify-only")
    assert code == 1, out
    different = "\n".join(line for line in out.splitlines() if "DIFFERENT" in line)
    assert f"acme/api/jobs (stack id 4): update {update_id}: 5 events on the source, 4" in different
    assert "acme/api/jobs (stack id 4): tags is {'team': 'platform'}" in different
    assert "table events: " in different
    assert "access token tok-cli: last_used differs" in different
    assert "identity alice: disabled differs" in different
    assert "audit events of acme: event 3 is only on the source" in different
    assert "table audit_events: 5 rows on the source, 4 on the destination" in different


def test_refusals(
    source: Source, quiet_source: Source, new_database: Callable[[], str], tmp_path: Path
) -> None:
    pg = new_database()
    # Running updates need --allow-running; nothing is written without it.
    code, out, err = port("--from", str(source.path), "--to", pg)
    assert code == 2, out + err
    assert "2 update(s) are running" in err and "--allow-running" in err
    for stack in RUNNING:
        assert stack in err
    assert pg_rows(pg, "SELECT COUNT(*) FROM stacks") == [(0,)]

    # A destination that has stacks already.
    ported("--from", str(quiet_source.path), "--to", pg)
    code, out, err = port("--from", str(quiet_source.path), "--to", pg)
    assert code == 2 and "already has stacks or updates" in err, out + err
    # Or only an audit event (a daemon ran there): its ids would collide with the source's.
    audited = new_database()
    store = PostgresStore.open(audited, InlineRunner())
    try:
        later = AuditRecord(START, ORG, "", "login", "", 401, "::1", auth_failure=True)
        _sync.successResultOf(store.add_audit_events([later]))
    finally:
        store.close()
    code, out, err = port("--from", str(quiet_source.path), "--to", audited)
    assert code == 2 and "audit events" in err, out + err

    # The source itself, however it is spelled.
    code, _out, err = port("--from", str(quiet_source.path), "--to", str(quiet_source.path))
    assert code == 2 and "same database" in err
    code, _out, err = port("--from", pg, "--to", pg.replace("127.0.0.1", "localhost"))
    assert code == 2 and "same database" in err

    # A SQLite file that is not there is not created as a source.
    code, _out, err = port("--from", str(tmp_path / "missing.sqlite"), "--to", pg)
    assert code == 2 and "no SQLite database" in err
    assert not (tmp_path / "missing.sqlite").exists()


def test_the_console_script_runs(quiet_source: Source, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["port", "--help"])
    assert exited.value.code == 0 and "Stop the daemon" in capsys.readouterr().out
    script = Path(sys.executable).parent / "pulumid-admin"
    done = subprocess.run(
        [str(script), "port", "--from", str(quiet_source.path), "--to", str(quiet_source.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "same database" in done.stderr, done.stderr


def test_a_daemon_serves_the_ported_database(
    source: Source,
    new_database: Callable[[], str],
    new_prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    pg, blobs = new_database(), new_prefix()
    ported("--from", str(source.path), "--to", pg, "--to-blob-store", blobs, "--allow-running")
    daemon = Daemon(
        tmp_path / "daemon",
        flags={"database": pg, "blob_store": blobs, "lease_ttl": 2},
        org=ORG,
        master_key=MASTER_KEY,
    )
    daemon.start()
    try:
        _same_exports(daemon, source)
        # The secrets key came along, still wrapped by the same master key.
        answer = daemon.api_ok(
            "POST",
            "/api/stacks/acme/site/prod/decrypt",
            {"ciphertext": base64.b64encode(source.ciphertext).decode()},
        )
        assert base64.b64decode(answer["plaintext"]) == b"hunter2"
        # The updates ported as running expire there, keeping what they had saved.
        for stack in RUNNING:

            def ended(stack: str = stack) -> bool:
                body = daemon.api_ok("GET", f"/api/stacks/{stack}")
                return not body.get("currentOperation")

            wait_until(ended, 30, f"the running update of {stack} to expire", 0.2, daemon.log_text)
        _same_exports(daemon, source)
    finally:
        daemon.stop()


def _same_exports(daemon: Daemon, source: Source) -> None:
    for ref, exported in source.exports.items():
        got = daemon.api_ok("GET", f"/api/stacks/{ref}/export")
        assert _timeless(got, ref) == _timeless(exported.current, ref), ref
        newest = max(exported.versions, default=0)
        for version, text in exported.versions.items():
            if version < 1:
                continue
            got = daemon.api_ok("GET", f"/api/stacks/{ref}/export/{version}")
            if version == newest:
                # The newest version of a stack being updated exports the update's progress.
                assert _timeless(got, ref) == _timeless(exported.current, ref), (ref, version)
            else:
                assert got == json.loads(text), (ref, version)


def _timeless(document: Any, ref: str) -> Any:
    """DOCUMENT without the time a running journal's replay stamps on its manifest."""
    if ref == "acme/api/jobs":
        document = json.loads(json.dumps(document))
        document["deployment"]["manifest"].pop("time")
    return document
