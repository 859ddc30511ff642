"""Online backups (pulumid/ops/backups.py): snapshots of a live SQLite database while writers
go on, manifests, retention, S3 destinations on a real MinIO, PostgreSQL (+ S3 blobs) sources
on a real PostgreSQL, the Backups service, and the daemon's /api/admin/backups."""

from __future__ import annotations

import base64
import functools
import gc
import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import boto3
import pytest
import pytest_twisted
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

import tests.minio
import tests.postgres
from pulumid import __version__
from pulumid.admin import port as port_module
from pulumid.admin.__main__ import main as admin_main
from pulumid.config import Config, Options
from pulumid.ops.backups import (
    DATA_SUFFIX,
    MANIFEST_SUFFIX,
    PREFIX,
    BackupError,
    Backups,
    Destination,
    DirectoryTarget,
    Outcome,
    S3Target,
    Snapshot,
    decompress,
    manifests,
    parse_destination,
    prune,
    take,
)
from pulumid.ops.metrics import Metrics
from pulumid.secrets import crypto
from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import CANARY_CONTEXT, CANARY_PLAINTEXT, local_key_id
from pulumid.storage.interface import Store
from pulumid.storage.postgres import PostgresStore
from pulumid.storage.records import StackRef, StateBlob, UpdateRecord
from pulumid.storage.schema import SCHEMA_VERSION
from pulumid.storage.sqlite import SQLiteStore
from pulumid.tap import make_backend
from pulumid.threads import InlineRunner, Runner
from tests.admin.test_port import MASTER_KEY, START, Source, build_source, exports_of
from tests.api.test_api import serve
from tests.minio import BUCKET, s3_url

# The session servers, started only when a test asks for them (as the conftests re-export
# them elsewhere; assigned rather than imported so parameters may share their names).
aws_env = tests.minio.aws_env
minio_endpoint = tests.minio.minio_endpoint
postgres_server = tests.postgres.postgres_server

T = TypeVar("T")
P = ParamSpec("P")
_sync = SynchronousTestCase()
NOW = START + 1000.0  # 2023-11-14T22:30:00Z
KEY = MasterKey.from_hex(MASTER_KEY)


def ok(d: Deferred[T]) -> T:
    return _sync.successResultOf(d)


# -- helpers --------------------------------------------------------------------------------


def table_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (sqlite_sequence included), in a stable order."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            table: sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
            for table in tables
        }


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result


def unpacked(packed: Path, dest: Path) -> Path:
    decompress(packed, dest)
    return dest


def directory(path: Path, keep: int = 14, max_age: float = 0.0) -> Destination:
    return Destination(DirectoryTarget(path), keep, max_age)


def names_at(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A database built through the real Backend: six stacks, updates (some running, with
    journal batches and deltas), states, events, a data key, a renamed and a deleted stack."""
    return build_source(tmp_path_factory.mktemp("source") / "pulumid.sqlite", running=True)


@pytest.fixture(scope="module")
def quiet_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return build_source(tmp_path_factory.mktemp("quiet") / "pulumid.sqlite", running=False)


# -- destinations ---------------------------------------------------------------------------


def test_parse_destination_directories_and_options(tmp_path: Path) -> None:
    plain = parse_destination(str(tmp_path / "bk"), 7, 0.0)
    assert isinstance(plain.target, DirectoryTarget)
    assert (plain.target.path, plain.keep, plain.max_age) == (tmp_path / "bk", 7, 0.0)
    assert plain.label == str(tmp_path / "bk")

    own = parse_destination(f"{tmp_path}/bk?keep=3&max_age=30d", 7, 60.0)
    assert isinstance(own.target, DirectoryTarget)
    assert (own.target.path, own.keep, own.max_age) == (tmp_path / "bk", 3, 30 * 86400.0)
    assert parse_destination(f"{tmp_path}?max_age=6h", 7, 0.0).max_age == 6 * 3600.0

    home = parse_destination("~/backups", 1, 0.0)
    assert isinstance(home.target, DirectoryTarget)
    assert home.target.path == Path("~/backups").expanduser()

    for bad, words in [
        (f"{tmp_path}?keep=0", "keep must be a whole number"),
        (f"{tmp_path}?keep=two", "keep must be a whole number"),
        (f"{tmp_path}?endpoint=http://x", "want a directory or s3://"),
        ("https://example.com/backups", "want a directory or s3://"),
        ("", "empty"),
        ("?keep=2", "empty"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_destination(bad, 1, 0.0)
    with pytest.raises(ValueError):
        parse_destination(f"{tmp_path}?max_age=forever", 1, 0.0)


def test_parse_destination_s3(aws_env: None) -> None:
    spec = (
        "s3://my-backups/site/daily?endpoint=http://127.0.0.1:9000&region=eu-west-1"
        "&path_style=true&keep=5&max_age=7d"
    )
    dest = parse_destination(spec, 14, 0.0)
    assert isinstance(dest.target, S3Target)
    assert (dest.target.bucket, dest.target.prefix) == ("my-backups", "site/daily/")
    assert dest.label == "s3://my-backups/site/daily/"
    assert (dest.keep, dest.max_age) == (5, 7 * 86400.0)
    with pytest.raises(ValueError, match="unknown option"):
        parse_destination("s3://my-backups/x?colour=blue", 1, 0.0)
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        parse_destination("s3://A_B/x", 1, 0.0)


def test_flags_and_the_service_the_tap_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("PULUMID_"):
            monkeypatch.delenv(name)

    def parse(*args: str) -> Config:
        options = Options()
        options.parseOptions(["--token", "t0ken-for-tests", *args])
        config: Config = options.config
        return config

    assert (parse().backup_to, parse().backup_schedule) == ((), 0.0)
    config = parse(
        "--database", str(tmp_path / "db.sqlite"),
        "--backup-to", f" {tmp_path}/a , {tmp_path}/b?keep=3&max_age=2d ,",
        "--backup-schedule", "6h", "--backup-keep", "5", "--backup-max-age", "30d",
    )  # fmt: skip
    assert config.backup_to == (f"{tmp_path}/a", f"{tmp_path}/b?keep=3&max_age=2d")
    assert (config.backup_schedule, config.backup_keep) == (6 * 3600.0, 5)
    assert config.backup_max_age == 30 * 86400.0
    for args, words in [
        (("--backup-schedule", "1h"), "--backup-to"),
        (("--backup-to", f"{tmp_path}?keep=0"), "--backup-to: "),
        (("--backup-to", "ftp://host/x"), "--backup-to: "),
        (("--backup-keep", "0"), "must be positive"),
    ]:
        with pytest.raises(UsageError, match=words):
            parse(*args)

    top, backend = make_backend(replace(config, master_key="5e" * 32), reactor)
    try:
        backups = backend.backups
        assert isinstance(backups, Backups)
        assert backups.source == Snapshot(str(tmp_path / "db.sqlite"), "inline", False)
        assert [(d.label, d.keep, d.max_age) for d in backups.destinations] == [
            (f"{tmp_path}/a", 5, 30 * 86400.0),
            (f"{tmp_path}/b", 3, 2 * 86400.0),
        ]
        assert top.getServiceNamed("backups").step == 6 * 3600.0
    finally:
        top.getServiceNamed("storage").store.close()
    plain = replace(config, backup_to=(), backup_schedule=0.0, database=str(tmp_path / "2.db"))
    top, backend = make_backend(replace(plain, master_key="5e" * 32), reactor)
    try:
        assert backend.backups is None
        with pytest.raises(KeyError):
            top.getServiceNamed("backups")
    finally:
        top.getServiceNamed("storage").store.close()


# -- taking one -----------------------------------------------------------------------------


def test_take_sqlite_manifest_and_copy(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    dest = directory(folder)
    outcome = take(Snapshot(str(source.path)), [dest], NOW)
    assert outcome.stored == [str(folder)]
    assert outcome.failed == {}
    assert outcome.deleted == {str(folder): []}

    manifest = outcome.manifest
    name = manifest["name"]
    assert name.startswith(PREFIX + "20231114T223000Z-"), name
    assert names_at(folder) == [name + DATA_SUFFIX, name + MANIFEST_SUFFIX]
    assert json.loads((folder / (name + MANIFEST_SUFFIX)).read_text()) == manifest
    packed = folder / (name + DATA_SUFFIX)
    assert manifest["file"] == packed.name
    assert manifest["format"] == 1
    assert manifest["created"] == NOW
    assert manifest["created_at"] == "2023-11-14T22:30:00Z"
    assert manifest["pulumid_version"] == __version__
    assert manifest["source"] == "sqlite"
    assert manifest["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert manifest["size"] == packed.stat().st_size
    assert manifest["duration_seconds"] >= 0

    with closing(sqlite3.connect(source.path)) as conn:
        one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        expected = {
            "schema_version": SCHEMA_VERSION,
            "stacks": one("SELECT COUNT(*) FROM stacks"),
            "updates": one("SELECT COUNT(*) FROM updates"),
            "resources": one("SELECT SUM(resource_count) FROM stacks"),
            "newest_update": one(
                "SELECT MAX(COALESCE(end_time, start_time, created)) FROM updates WHERE dry_run = 0"
            ),
        }
        canary = one(f"SELECT value FROM meta WHERE key = 'key_canary:{local_key_id(KEY)}'")
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["stacks"] == 6 and manifest["updates"] >= 12 and manifest["resources"] > 10
    key_id = local_key_id(KEY)
    keys = manifest["keys"]
    assert keys["in_use"] == {key_id: 1}  # site/prod's data key
    assert keys["legacy_canary"] is None
    assert list(keys["canaries"]) == [key_id]
    assert base64.b64decode(keys["canaries"][key_id]) == bytes(canary)
    opened = crypto.open_with_master(
        KEY, base64.b64decode(keys["canaries"][key_id]), CANARY_CONTEXT
    )
    assert opened == CANARY_PLAINTEXT

    # Private files; nothing half-written left behind.
    assert os.stat(packed).st_mode & 0o777 == 0o600
    assert os.stat(folder / (name + MANIFEST_SUFFIX)).st_mode & 0o777 == 0o600
    assert os.stat(folder).st_mode & 0o077 == 0

    copy = unpacked(packed, tmp_path / "copy.db")
    assert manifest["database_size"] == copy.stat().st_size
    assert integrity(copy) == "ok"
    assert table_rows(copy) == table_rows(source.path)
    assert exports_of(copy, source.exported_at) == source.exports


def test_take_refuses_a_missing_or_foreign_database(tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    with pytest.raises(BackupError, match="does not exist"):
        take(Snapshot(str(tmp_path / "nope.db")), [directory(folder)], NOW)
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    with pytest.raises(BackupError, match="cannot be read"):
        take(Snapshot(str(foreign)), [directory(folder)], NOW)
    assert names_at(folder) == []
    assert not list(tmp_path.glob("pulumid-backup-*"))  # scratch directories cleaned


@pytest.mark.parametrize("folder", ["a#b", "q?x", "50%20off"])
def test_a_database_path_with_uri_characters(
    quiet_source: Source, tmp_path: Path, folder: str
) -> None:
    (tmp_path / folder).mkdir()
    database = tmp_path / folder / "pulumid.sqlite"
    shutil.copyfile(quiet_source.path, database)
    outcome = take(Snapshot(str(database)), [directory(tmp_path / "bk")], NOW)
    assert outcome.manifest["stacks"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bk", folder])


# -- consistency while writers go on -------------------------------------------------------


def _state(n: int, version: int) -> StateBlob:
    # Incompressible filler so the file grows and each snapshot takes a while.
    text = json.dumps({"stack": n, "version": version, "pad": os.urandom(6000).hex()})
    return StateBlob(gzip.compress(text.encode()), version + n % 5)


def _import(stack_id: int, n: int) -> UpdateRecord:
    return UpdateRecord(
        id=str(uuid.uuid4()), stack_id=stack_id, kind="import", dry_run=False,
        status="not-started", version=0, program={"name": "p"}, config={},
        metadata={"message": f"import into s{n}"}, created=START + n, end_time=START + n,
    )  # fmt: skip


class Writer(threading.Thread):
    """Commits, one transaction each, stack creations (stack, tags and state 0 together) and
    imports (update, state and the stack's version together) through a SQLiteStore of its
    own, until stopped."""

    def __init__(self, store: Store) -> None:
        super().__init__(name="backup-writer", daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.commits = 0
        self.stacks = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                ref = StackRef("acme", f"p{n % 3}", f"s{n}")
                stack = ok(self.store.create_stack(ref, {"n": str(n)}, START + n, _state(n, 0)))
                self.stacks += 1
                self.commits += 1
                for version in range(1, 1 + n % 3):
                    done = ok(self.store.import_state(_import(stack.id, n), _state(n, version), 0))
                    assert done == version
                    self.commits += 1
        except BaseException as e:
            self.errors.append(e)

    def wait_for(self, commits: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.commits < commits:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.005)


def check_whole(db: Path) -> tuple[int, int]:
    """Every transaction the writer committed is in DB whole, or not at all; its counts."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        stacks = conn.execute("SELECT id, name, version, resource_count FROM stacks").fetchall()
        ids = sorted(row[0] for row in stacks)
        assert ids == list(range(1, len(ids) + 1)), "a stack is missing from the middle"
        for stack_id, name, version, resources in stacks:
            n = int(name[1:])
            versions = [
                row[0]
                for row in conn.execute(
                    "SELECT version FROM states WHERE stack_id = ? ORDER BY version", (stack_id,)
                )
            ]
            assert versions == list(range(version + 1)), (name, version, versions)
            updates = conn.execute(
                "SELECT COUNT(*) FROM updates WHERE stack_id = ?", (stack_id,)
            ).fetchone()[0]
            assert updates == version, (name, version, updates)
            assert resources == version + n % 5
            tags = conn.execute(
                "SELECT name, value FROM stack_tags WHERE stack_id = ?", (stack_id,)
            ).fetchall()
            assert ("n", str(n)) in tags
            [data] = conn.execute(
                "SELECT data FROM states WHERE stack_id = ? AND version = ?", (stack_id, version)
            ).fetchone()
            assert json.loads(gzip.decompress(data))["version"] == version
        total = conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        return len(ids), total


def test_snapshots_are_consistent_while_writers_go_on(tmp_path: Path) -> None:
    path = tmp_path / "live.sqlite"
    store = SQLiteStore.open(path, InlineRunner(), sync_commits=False)
    writer = Writer(store)
    folder = tmp_path / "bk"
    taken: list[Outcome] = []
    bounds: list[tuple[int, int]] = []  # stacks committed before a backup began, and after
    during = 0  # commits made while backups were being taken
    writer.start()
    try:
        for round in range(6):
            writer.wait_for(writer.commits + 25)  # between two backups, more commits land
            stacks, commits = writer.stacks, writer.commits
            taken.append(take(Snapshot(str(path)), [directory(folder, keep=100)], NOW + round))
            # (The writer counts a stack just after its commit: one more may be in.)
            bounds.append((stacks, writer.stacks + 1))
            during += writer.commits - commits
            assert not writer.errors, writer.errors
    finally:
        writer.stop.set()
        writer.join(30)
    assert not writer.is_alive() and not writer.errors, writer.errors
    # The live file still has the writer's last commits in its WAL: they are in the copy.
    final = take(Snapshot(str(path)), [directory(folder, keep=100)], NOW + 10)
    store.close()

    seen: list[tuple[int, int]] = []
    for index, outcome in enumerate([*taken, final]):
        manifest = outcome.manifest
        copy = unpacked(folder / manifest["file"], tmp_path / f"copy{index}.db")
        assert integrity(copy) == "ok"
        counts = check_whole(copy)
        assert counts == (manifest["stacks"], manifest["updates"])
        if index < len(bounds):
            assert bounds[index][0] <= counts[0] <= bounds[index][1], (counts, bounds[index])
        seen.append(counts)
    assert seen == sorted(seen), f"counts went backwards: {seen}"
    assert len(set(seen)) == len(seen), f"a backup missed commits made before it: {seen}"
    assert seen[0][0] > 0
    assert during > 0, "no commit landed while a backup was being taken"
    assert table_rows(tmp_path / f"copy{len(taken)}.db") == table_rows(path)
    assert len(manifests(DirectoryTarget(folder))) == 7


# -- listing and retention ------------------------------------------------------------------


def test_retention_by_count(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    dest = directory(folder, keep=2)
    names = []
    for n in range(4):
        outcome = take(Snapshot(str(source.path)), [dest], NOW + 100 * n)
        names.append(outcome.manifest["name"])
        assert outcome.deleted[str(folder)] == ([names[n - 2]] if n >= 2 else [])
    assert [m["name"] for m in manifests(dest.target)] == [names[3], names[2]]
    expected = sorted(n + suffix for n in names[2:] for suffix in (DATA_SUFFIX, MANIFEST_SUFFIX))
    assert names_at(folder) == expected


def test_retention_by_age_never_drops_the_one_just_taken(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    aged = directory(folder, keep=10, max_age=250.0)
    names = [take(Snapshot(str(source.path)), [aged], NOW + t).manifest["name"] for t in (0, 100)]
    outcome = take(Snapshot(str(source.path)), [aged], NOW + 300)
    # Created before NOW + 300 - 250: only the first.
    assert outcome.deleted[str(folder)] == [names[0]]
    listed = [m["name"] for m in manifests(aged.target)]
    assert listed == [outcome.manifest["name"], names[1]]

    # A clock gone back: the new backup is the oldest by `created`, over both limits, and
    # still kept; the newest by `created` stays too.
    strict = directory(folder, keep=1, max_age=1.0)
    back = take(Snapshot(str(source.path)), [strict], NOW - 5000)
    assert sorted(back.deleted[str(folder)]) == [names[1]]
    assert [m["name"] for m in manifests(strict.target)] == [
        outcome.manifest["name"],
        back.manifest["name"],
    ]
    assert len(names_at(folder)) == 4


def test_only_complete_backups_are_listed_and_pruned(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    dest = directory(folder, keep=1)
    kept = take(Snapshot(str(source.path)), [dest], NOW).manifest
    # A data file whose manifest never came (the upload died between the two).
    orphan = PREFIX + "20231114T000000Z-abcdef"
    (folder / (orphan + DATA_SUFFIX)).write_bytes(b"\x1f\x8b partial")
    # A manifest that is not JSON, one without `created`, and files of someone else's.
    (folder / (PREFIX + "broken" + MANIFEST_SUFFIX)).write_text("{not json")
    (folder / (PREFIX + "undated" + MANIFEST_SUFFIX)).write_text('{"name": "x"}')
    (folder / "notes.json").write_text(json.dumps({"created": 1, "name": "notes"}))
    assert [m["name"] for m in manifests(dest.target)] == [kept["name"]]
    # Pruning touches only what it lists.
    assert prune(dest, NOW + 10) == []
    assert (folder / (orphan + DATA_SUFFIX)).exists()
    assert (folder / "notes.json").exists()
    # A manifest naming a file outside the backup prefix is never deleted by name.
    (folder / (PREFIX + "odd" + MANIFEST_SUFFIX)).write_text(
        json.dumps({"created": NOW - 1, "name": "../../etc/passwd"})
    )
    assert prune(dest, NOW + 10) == []
    assert DirectoryTarget(tmp_path / "absent").names() == []
    assert manifests(DirectoryTarget(tmp_path / "absent")) == []


class _BrokenListing(DirectoryTarget):
    def names(self) -> list[str]:
        raise BackupError("listing failed")


def test_a_failing_destination_does_not_stop_the_others(source: Source, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    bad = directory(tmp_path / "a-file" / "bk")
    good = directory(tmp_path / "good")
    unlisted = Destination(_BrokenListing(tmp_path / "unlisted"), 1, 0.0)
    outcome = take(Snapshot(str(source.path)), [bad, good, unlisted], NOW)
    assert outcome.stored == [good.label, unlisted.label]
    assert set(outcome.failed) == {bad.label, unlisted.label}
    assert "Not a directory" in outcome.failed[bad.label]
    assert outcome.failed[unlisted.label] == "stored, but pruning failed: listing failed"
    assert len(names_at(tmp_path / "good")) == 2
    assert len(names_at(tmp_path / "unlisted")) == 2


# -- S3 destinations on MinIO ---------------------------------------------------------------


def _objects(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in page.get("Contents", []))
    finally:
        client.close()


def test_s3_destination(source: Source, minio_endpoint: str, tmp_path: Path) -> None:
    prefix = "backups-" + uuid.uuid4().hex[:12]
    dest = parse_destination(s3_url(minio_endpoint, prefix) + "&keep=2", 14, 0.0)
    assert dest.label == f"s3://{BUCKET}/{prefix}/"
    assert manifests(dest.target) == []
    names = []
    for n in range(3):
        outcome = take(Snapshot(str(source.path)), [dest], NOW + 60 * n)
        assert (outcome.stored, outcome.failed) == ([dest.label], {})
        names.append(outcome.manifest["name"])
    assert outcome.deleted == {dest.label: [names[0]]}
    assert _objects(minio_endpoint, prefix + "/") == sorted(
        f"{prefix}/{name}{suffix}" for name in names[1:] for suffix in (DATA_SUFFIX, ".json")
    )
    listed = manifests(dest.target)
    assert [m["name"] for m in listed] == [names[2], names[1]]
    assert listed[0] == outcome.manifest

    # The stored object is the one the manifest describes.
    copy = tmp_path / "copy.db.gz"
    dest.target.get(outcome.manifest["file"], copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == outcome.manifest["sha256"]
    assert table_rows(unpacked(copy, tmp_path / "copy.db")) == table_rows(source.path)
    with pytest.raises(BackupError, match=r"reading .* failed \(NoSuchKey\)"):
        dest.target.read(names[0] + MANIFEST_SUFFIX)


def test_a_failing_s3_destination_is_reported(
    source: Source, minio_endpoint: str, tmp_path: Path
) -> None:
    missing = parse_destination(
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x?endpoint={minio_endpoint}"
        "&region=us-east-1&path_style=true",
        3,
        0.0,
    )
    good = directory(tmp_path / "bk")
    outcome = take(Snapshot(str(source.path)), [missing, good], NOW)
    assert outcome.stored == [good.label]
    assert list(outcome.failed) == [missing.label]
    assert "NoSuchBucket" in outcome.failed[missing.label], outcome.failed
    assert [m["name"] for m in manifests(good.target)] == [outcome.manifest["name"]]
    with pytest.raises(BackupError, match="listing failed"):
        manifests(missing.target)


# -- PostgreSQL and S3 blob sources ---------------------------------------------------------


def _port(*args: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = admin_main(["port", *args], out=out, err=err)
    assert code == 0, f"port {args}: {code}\n{out.getvalue()}\n{err.getvalue()}"


def test_postgres_and_s3_blobs_source(
    quiet_source: Source,
    postgres_server: tests.postgres.PostgresServer,
    minio_endpoint: str,
    tmp_path: Path,
) -> None:
    pg = postgres_server.create_database("backup")
    blobs = s3_url(minio_endpoint, "backup-src-" + uuid.uuid4().hex[:12])
    _port("--from", str(quiet_source.path), "--to", pg, "--to-blob-store", blobs)
    folder = tmp_path / "bk"
    outcome = take(Snapshot(pg, blobs, postgres=True), [directory(folder)], NOW)
    assert outcome.stored == [str(folder)], outcome.failed
    manifest = outcome.manifest
    assert manifest["source"] == "postgresql"
    assert (manifest["stacks"], manifest["resources"]) == (6, 17)
    assert manifest["keys"]["in_use"] == {local_key_id(KEY): 1}
    copy = unpacked(folder / manifest["file"], tmp_path / "copy.db")
    assert integrity(copy) == "ok"
    with closing(sqlite3.connect(copy)) as conn:  # blobs inline, no references left
        assert all(bytes(d)[:2] == b"\x1f\x8b" for (d,) in conn.execute("SELECT data FROM states"))
    assert exports_of(copy, quiet_source.exported_at) == quiet_source.exports
    postgres_server.drop_database(pg)


def test_sqlite_with_s3_blobs_source(
    quiet_source: Source, minio_endpoint: str, tmp_path: Path
) -> None:
    blobs = s3_url(minio_endpoint, "backup-src-" + uuid.uuid4().hex[:12])
    database = tmp_path / "split.sqlite"
    _port("--from", str(quiet_source.path), "--to", str(database), "--to-blob-store", blobs)
    outcome = take(Snapshot(str(database), blobs), [directory(tmp_path / "bk")], NOW)
    assert outcome.manifest["source"] == "sqlite"
    copy = unpacked(tmp_path / "bk" / outcome.manifest["file"], tmp_path / "copy.db")
    assert exports_of(copy, quiet_source.exported_at) == quiet_source.exports


def test_postgres_source_while_a_writer_goes_on(
    postgres_server: tests.postgres.PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon's write lands right after the copy's snapshot: the backup still succeeds
    (nothing compares the copy with the source as it is now) and holds the snapshot."""
    pg = postgres_server.create_database("backup_live")
    store = PostgresStore.open(pg, InlineRunner())
    try:
        for n in range(1, 4):
            ref = StackRef("acme", "p", f"s{n}")
            stack = ok(store.create_stack(ref, {"n": str(n)}, START, _state(n, 0)))
            for version in range(1, 1 + n % 3):
                ok(store.import_state(_import(stack.id, n), _state(n, version), 0))
        copy_all = port_module._copy

        def written_meanwhile(*args: Any) -> None:
            copy_all(*args)
            ok(store.create_stack(StackRef("acme", "p", "s4"), {"n": "4"}, START, _state(4, 0)))

        monkeypatch.setattr(port_module, "_copy", written_meanwhile)
        outcome = take(Snapshot(pg, postgres=True), [directory(tmp_path / "bk")], NOW)
        assert outcome.stored == [str(tmp_path / "bk")], outcome.failed
        copy = unpacked(tmp_path / "bk" / outcome.manifest["file"], tmp_path / "copy.db")
        assert check_whole(copy) == (3, 3)
        assert (outcome.manifest["stacks"], outcome.manifest["updates"]) == (3, 3)
        assert ok(store.get_stack(StackRef("acme", "p", "s4"))) is not None
    finally:
        store.close()
        postgres_server.drop_database(pg)


# -- the service ----------------------------------------------------------------------------


class HeldRunner(Runner):
    """A Runner whose calls wait until the test lets them run (as a thread pool's would)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.calls.append((functools.partial(f, **kwargs), args, d))
        return d

    def finish(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


@pytest.fixture
def claims(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore.open(tmp_path / "claims.sqlite", InlineRunner())
    try:
        yield store
    finally:
        store.close()


def _gauges(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pulumid_backup_")
    }


def test_service_runs_one_backup_at_a_time_and_records_it(
    source: Source, tmp_path: Path, claims: SQLiteStore
) -> None:
    clock = Clock()
    clock.advance(NOW)
    runner = HeldRunner()
    (tmp_path / "a-file").write_text("")
    good, bad = directory(tmp_path / "bk"), directory(tmp_path / "a-file" / "bk")
    backups = Backups(Snapshot(str(source.path)), [good, bad], runner, claims, clock, "n1")
    metrics = Metrics()
    backups.register(metrics)

    first = Deferred.fromCoroutine(backups.run())
    second = Deferred.fromCoroutine(backups.run())
    assert len(runner.calls) == 1  # the second waits for the first
    runner.finish()
    outcome = ok(first)
    assert ok(second) is outcome
    assert outcome.stored == [good.label] and list(outcome.failed) == [bad.label]
    assert backups.last_success == {good.label: NOW}
    assert backups.last_failure == {bad.label: NOW}
    gauges = _gauges(metrics)
    success = f'pulumid_backup_last_success_timestamp_seconds{{destination="{good.label}"}}'
    failure = f'pulumid_backup_last_failure_timestamp_seconds{{destination="{bad.label}"}}'
    assert gauges[success] == NOW
    assert gauges[failure] == NOW
    assert gauges["pulumid_backup_last_size_bytes"] == outcome.manifest["size"]
    assert gauges["pulumid_backup_last_duration_seconds"] == outcome.manifest["duration_seconds"]

    # Done: the next run takes a new one.
    clock.advance(3600)
    third = Deferred.fromCoroutine(backups.run())
    assert len(runner.calls) == 1
    runner.finish()
    assert ok(third).manifest["created"] == NOW + 3600
    assert backups.last_success == {good.label: NOW + 3600}

    backups.list_runner = runner
    listing = Deferred.fromCoroutine(backups.list())
    runner.finish()
    listed = ok(listing)
    assert [(m["created"], m["destination"]) for m in listed] == [
        (NOW + 3600, good.label),
        (NOW, good.label),
    ]


def test_service_failure_marks_every_destination(tmp_path: Path, claims: SQLiteStore) -> None:
    clock = Clock()
    clock.advance(NOW)
    runner = HeldRunner()
    dest = directory(tmp_path / "bk")
    missing = Snapshot(str(tmp_path / "nope.db"))
    backups = Backups(missing, [dest], runner, claims, clock, "n1")
    running = Deferred.fromCoroutine(backups.run())
    runner.finish()
    error = _sync.failureResultOf(running, BackupError).value
    assert "does not exist" in str(error)
    assert backups.last_failure == {dest.label: NOW}
    assert backups.last_success == {}


def test_service_with_a_runner_that_answers_at_once(
    source: Source, tmp_path: Path, claims: SQLiteStore
) -> None:
    clock = Clock()
    clock.advance(NOW)
    dest = directory(tmp_path / "bk")
    backups = Backups(Snapshot(str(source.path)), [dest], InlineRunner(), claims, clock, "n1")
    outcome = ok(Deferred.fromCoroutine(backups.run()))
    assert outcome.stored == [dest.label]


def test_a_failed_backup_is_logged_once(tmp_path: Path, claims: SQLiteStore) -> None:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        clock = Clock()
        runner = HeldRunner()
        missing = Snapshot(str(tmp_path / "nope.db"))
        backups = Backups(missing, [directory(tmp_path / "bk")], runner, claims, clock, "n1")
        running = Deferred.fromCoroutine(backups.run())
        runner.finish()
        _sync.failureResultOf(running, BackupError)
        del running, backups, runner
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["log_format"] for e in events if e.get("log_format")] == ["backup failed: {error}"]


def test_scheduled_backups_are_claimed_by_one_node(
    source: Source, tmp_path: Path, claims: SQLiteStore
) -> None:
    clock = Clock()
    clock.advance(NOW)
    runner = HeldRunner()
    dest = directory(tmp_path / "bk")
    snapshot = Snapshot(str(source.path))
    one = Backups(snapshot, [dest], runner, claims, clock, "node-1")
    two = Backups(snapshot, [dest], runner, claims, clock, "node-2")
    first = Deferred.fromCoroutine(one.scheduled(60))
    runner.finish()
    assert ok(first) is None
    clock.advance(30)
    assert ok(Deferred.fromCoroutine(two.scheduled(60))) is None
    assert runner.calls == []  # node-2 found node-1's claim
    clock.advance(31)
    later = Deferred.fromCoroutine(two.scheduled(60))
    runner.finish()
    ok(later)
    assert [m["created"] for m in manifests(dest.target)] == [NOW + 61, NOW]


# -- the daemon -----------------------------------------------------------------------------


def _metric(server: Any, name: str, **labels: str) -> float:
    text = generate_latest(server.backend.metrics.registry).decode()
    shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
    wanted = name + (f"{{{shown}}}" if shown else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {wanted} in:\n{text}")


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_daemon_takes_and_lists_backups(tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    async with serve(tmp_path, backup_to=(f"{folder}?keep=2",)) as server:
        for name in ("dev", "prod"):
            await server.ok("POST", "/api/stacks/acme/web", {"stackName": name})
        before = time.time()
        reply = await server.call("POST", "/api/admin/backups")
        assert reply.code == 201, reply.body
        body = reply.json()
        assert set(body) == {"backup", "stored", "failed"}
        assert body["stored"] == [str(folder)] and body["failed"] == {}
        manifest = body["backup"]
        assert (manifest["stacks"], manifest["source"]) == (2, "sqlite")
        assert manifest["created"] >= before
        assert json.loads((folder / (manifest["name"] + ".json")).read_text()) == manifest
        copy = unpacked(folder / manifest["file"], tmp_path / "copy.db")
        with closing(sqlite3.connect(copy)) as conn:
            assert sorted(conn.execute("SELECT name FROM stacks")) == [("dev",), ("prod",)]

        listed = await server.ok("GET", "/api/admin/backups")
        assert listed == {"backups": [{**manifest, "destination": str(folder)}]}
        success = _metric(
            server, "pulumid_backup_last_success_timestamp_seconds", destination=str(folder)
        )
        assert success == manifest["created"]
        assert _metric(server, "pulumid_backup_last_size_bytes") == manifest["size"]

        # keep=2 at the destination.
        for _ in range(2):
            assert (await server.call("POST", "/api/admin/backups")).code == 201
        listed = await server.ok("GET", "/api/admin/backups")
        assert len(listed["backups"]) == 2
        assert manifest["name"] not in {m["name"] for m in listed["backups"]}

        for method in ("POST", "GET"):
            call = server.call(method, "/api/admin/backups", auth="token wrong-token")
            (await call).assert_error(401)
            (await server.call(method, "/api/admin/backups", auth=None)).assert_error(401)


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_daemon_without_a_working_destination(tmp_path: Path) -> None:
    async with serve(tmp_path / "none") as server:
        message = (await server.call("POST", "/api/admin/backups")).assert_error(404)
        assert "--backup-to" in message
        (await server.call("POST", "/api/admin/backups", auth="token nope")).assert_error(401)
        (await server.call("GET", "/api/admin/backups", auth="token nope")).assert_error(401)
    (tmp_path / "a-file").write_text("")
    broken = str(tmp_path / "a-file" / "bk")
    async with serve(tmp_path / "broken", backup_to=(broken,)) as server:
        message = (await server.call("POST", "/api/admin/backups")).assert_error(503)
        assert "no destination took the backup" in message and broken in message
        assert _metric(
            server, "pulumid_backup_last_failure_timestamp_seconds", destination=broken
        ) == pytest.approx(time.time(), abs=60)
        assert await server.ok("GET", "/api/admin/backups") == {"backups": []}


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_daemon_lists_no_backups_without_a_destination_as_404(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        message = (await server.call("GET", "/api/admin/backups")).assert_error(404)
        assert "--backup-to" in message
