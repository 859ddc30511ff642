"""Online backups: a consistent snapshot of the database while updates go on, compressed,
checksummed and described by a manifest, kept in directories and S3 buckets.

A backup is always a SQLite file (gzip'd), whatever the daemon runs on: SQLite is copied by
`VACUUM INTO` on a connection of its own (a read snapshot: writers go on); PostgreSQL, or
blobs in object storage, are copied by pulumid-admin's port into a new SQLite file (blobs
inline), in one repeatable-read snapshot. So one restore serves every deployment: restore
the file, then port it onward if the target is PostgreSQL.

Each backup is two objects: NAME.db.gz, then NAME.json (the manifest: checksum, schema and
pulumid versions, counts, the key canaries). The manifest is written last: a backup without
one is incomplete and never listed. Everything here blocks: the daemon runs it on a thread.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import gzip
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from pulumid import __version__
from pulumid.config import duration
from pulumid.ops.metrics import Metrics
from pulumid.storage.interface import Store
from pulumid.threads import Runner

log = Logger(namespace="pulumid.backups")

FORMAT = 1
CHUNK = 1024 * 1024
MANIFEST_SUFFIX = ".json"
DATA_SUFFIX = ".db.gz"
PREFIX = "pulumid-backup-"


class BackupError(Exception):
    """A backup or restore cannot go on: the message says why."""


# -- destinations ---------------------------------------------------------------------------


class Target(ABC):
    """A place that keeps backup files by name."""

    label: str

    @abstractmethod
    def put(self, name: str, source: Path) -> None: ...

    @abstractmethod
    def get(self, name: str, dest: Path) -> None: ...

    @abstractmethod
    def read(self, name: str) -> bytes: ...

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...


class DirectoryTarget(Target):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def put(self, name: str, source: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.path / f".{name}.partial"
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o600)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, self.path / name)
        _fsync_dir(self.path)

    def get(self, name: str, dest: Path) -> None:
        try:
            shutil.copyfile(self.path / name, dest)
        except FileNotFoundError:
            raise BackupError(f"{self.path / name} does not exist") from None

    def read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            raise BackupError(f"{self.path / name} does not exist") from None

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name.startswith(PREFIX))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / name).unlink()


class S3Target(Target):
    """An S3 bucket and prefix (AWS, MinIO, or Google Cloud Storage's XML API with HMAC
    keys); credentials come from the AWS chain."""

    def __init__(self, url: str) -> None:
        from pulumid.storage.blobs import parse_s3_url, s3_client

        location = parse_s3_url(url)
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.label = f"s3://{location.bucket}/{location.prefix}"
        self._client = s3_client(location)

    def _call(self, what: str, f: Any, **args: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return f(Bucket=self.bucket, **args)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "unknown")
            raise BackupError(f"{self.label}: {what} failed ({code})") from None
        except BotoCoreError as e:
            raise BackupError(f"{self.label}: {what} failed ({type(e).__name__})") from None

    def put(self, name: str, source: Path) -> None:
        with open(source, "rb") as f:
            self._call(f"uploading {name}", self._client.put_object, Key=self.prefix + name, Body=f)

    def get(self, name: str, dest: Path) -> None:
        answer = self._call(f"reading {name}", self._client.get_object, Key=self.prefix + name)
        with open(dest, "wb") as out:
            for chunk in answer["Body"].iter_chunks(CHUNK):
                out.write(chunk)

    def read(self, name: str) -> bytes:
        answer = self._call(f"reading {name}", self._client.get_object, Key=self.prefix + name)
        return bytes(answer["Body"].read())

    def names(self) -> list[str]:
        found: list[str] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Prefix": self.prefix + PREFIX}
            if token:
                args["ContinuationToken"] = token
            page = self._call("listing", self._client.list_objects_v2, **args)
            found += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(found)
            token = page.get("NextContinuationToken")

    def delete(self, name: str) -> None:
        self._call(f"deleting {name}", self._client.delete_object, Key=self.prefix + name)


@dataclass(frozen=True)
class Destination:
    target: Target
    keep: int
    max_age: float  # seconds; 0: by count only

    @property
    def label(self) -> str:
        return self.target.label


def parse_destination(spec: str, keep: int, max_age: float) -> Destination:
    """A directory path or s3:// URL, with optional keep=N and max_age=DURATION options."""
    base, _, query = spec.partition("?")
    own: dict[str, str] = {}
    passed: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in ("keep", "max_age"):
            own[name] = value
        else:
            passed.append((name, value))
    try:
        if "keep" in own:
            keep = int(own["keep"])
            if keep < 1:
                raise ValueError
    except ValueError:
        raise ValueError(f"{spec!r}: keep must be a whole number of 1 or more") from None
    if "max_age" in own:
        max_age = duration(own["max_age"])
    if base.startswith("s3://"):
        url = base + ("?" + urlencode(passed) if passed else "")
        return Destination(S3Target(url), keep, max_age)
    if passed or urlsplit(base).scheme:
        raise ValueError(f"{spec!r}: want a directory or s3://bucket/prefix?endpoint=...")
    if not base:
        raise ValueError("a backup destination is empty")
    return Destination(DirectoryTarget(Path(base).expanduser()), keep, max_age)


def open_location(location: str) -> tuple[Target, str]:
    """A backup named by path or URL (its .json or .db.gz): where it is, and its name."""
    base, _, query = location.partition("?")
    if base.startswith("s3://"):
        folder, _, leaf = base.rpartition("/")
        url = folder + ("?" + query if query else "")
        return S3Target(url), _backup_name(leaf)
    path = Path(base).expanduser()
    return DirectoryTarget(path.parent), _backup_name(path.name)


def _backup_name(leaf: str) -> str:
    for suffix in (MANIFEST_SUFFIX, DATA_SUFFIX):
        if leaf.endswith(suffix):
            return leaf[: -len(suffix)]
    raise BackupError(f"{leaf!r} is not a backup: name its {MANIFEST_SUFFIX} or {DATA_SUFFIX}")


# -- taking one -----------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What a backup copies from: the daemon's database as pulumid-admin names it."""

    database: str  # a SQLite path or a PostgreSQL URL
    blob_store: str = "inline"
    postgres: bool = False


@dataclass
class Outcome:
    manifest: dict[str, Any]
    stored: list[str] = field(default_factory=list)  # destination labels
    failed: dict[str, str] = field(default_factory=dict)  # label -> why
    deleted: dict[str, list[str]] = field(default_factory=dict)


def new_name(now: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{PREFIX}{stamp}-{secrets.token_hex(3)}"


def take(
    source: Snapshot, destinations: list[Destination], now: float, scratch: Path | None = None
) -> Outcome:
    """Snapshot, describe, compress, store at every destination, apply retention."""
    started = time.monotonic()
    name = new_name(now)
    with tempfile.TemporaryDirectory(prefix="pulumid-backup-", dir=scratch) as work:
        db = Path(work) / "snapshot.db"
        copy_database(source, db)
        facts = describe_database(db)
        packed = Path(work) / (name + DATA_SUFFIX)
        sha256, size = compress(db, packed)
        manifest = {
            "format": FORMAT,
            "name": name,
            "file": name + DATA_SUFFIX,
            "created": now,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "pulumid_version": __version__,
            "source": "postgresql" if source.postgres else "sqlite",
            "sha256": sha256,
            "size": size,
            "database_size": db.stat().st_size,
            **facts,
        }
        manifest["duration_seconds"] = round(time.monotonic() - started, 3)
        manifest_file = Path(work) / (name + MANIFEST_SUFFIX)
        manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        outcome = Outcome(manifest)
        for destination in destinations:
            try:
                destination.target.put(name + DATA_SUFFIX, packed)
                destination.target.put(name + MANIFEST_SUFFIX, manifest_file)
            except (BackupError, OSError) as e:
                outcome.failed[destination.label] = str(e)
                continue
            outcome.stored.append(destination.label)
            try:
                outcome.deleted[destination.label] = prune(destination, now, keep_name=name)
            except (BackupError, OSError) as e:
                outcome.failed[destination.label] = f"stored, but pruning failed: {e}"
    return outcome


def copy_database(source: Snapshot, dest: Path) -> None:
    if not source.postgres and source.blob_store == "inline":
        vacuum_into(Path(source.database), dest)
        return
    from pulumid.admin.port import PortOptions, port

    origin = source.database
    with tempfile.TemporaryDirectory(prefix="pulumid-snapshot-") as work:
        if not source.postgres:
            # Blobs in object storage: snapshot the references first, then fetch the blobs.
            origin = str(Path(work) / "refs.db")
            vacuum_into(Path(source.database), Path(origin))
        options = PortOptions(
            source=origin,
            dest=str(dest),
            source_blobs=source.blob_store,
            dest_blobs="inline",
            allow_running=True,
            verify_only=False,
            verify=False,
        )
        log = Path(work) / "port.log"
        with open(log, "w") as out:
            status = port(options, out)
        if status != 0:
            raise BackupError(f"copying the database failed: {log.read_text()[-2000:]}")


def vacuum_into(database: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database: one read transaction, writers go on."""
    if not database.exists():
        raise BackupError(f"{database} does not exist")
    try:
        conn = sqlite3.connect(read_only_uri(database), uri=True, timeout=30.0)
        try:
            conn.execute("VACUUM INTO ?", (str(dest),))
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise BackupError(f"snapshot of {database} failed: {e}") from None
    os.chmod(dest, 0o600)


def read_only_uri(path: Path) -> str:
    # Quoted: a '#', '?' or '%' in the path would otherwise end or alter the URI.
    return f"file:{quote(str(path.absolute()))}?mode=ro"


def describe_database(db: Path) -> dict[str, Any]:
    """Counts, the schema version and the key canaries of a SQLite pulumid database."""
    try:
        conn = sqlite3.connect(read_only_uri(db), uri=True)
    except sqlite3.Error as e:
        raise BackupError(f"the database cannot be read: {e}") from None
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the database fails SQLite's integrity check: {check}")
        meta = {str(k): v for k, v in conn.execute("SELECT key, value FROM meta").fetchall()}
        keys = dict(conn.execute("SELECT key_id, COUNT(*) FROM stack_keys GROUP BY key_id"))
        newest = conn.execute(
            "SELECT MAX(COALESCE(end_time, start_time, created)) FROM updates WHERE dry_run = 0"
        ).fetchone()[0]
        return {
            "schema_version": int(_text(meta.get("schema_version", "0"))),
            "stacks": conn.execute("SELECT COUNT(*) FROM stacks").fetchone()[0],
            "updates": conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0],
            "resources": conn.execute(
                "SELECT COALESCE(SUM(resource_count), 0) FROM stacks"
            ).fetchone()[0],
            "newest_update": newest,
            "keys": {
                "in_use": keys,
                "site_key": _site_key_id(meta.get("site_key")),
                "canaries": {
                    k[len("key_canary:") :]: _b64(v)
                    for k, v in meta.items()
                    if k.startswith("key_canary:")
                },
                "legacy_canary": _b64(meta["master_key_canary"])
                if "master_key_canary" in meta
                else None,
            },
        }
    except sqlite3.Error as e:
        raise BackupError(f"the database cannot be read: {e}") from None
    finally:
        conn.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b64(value: Any) -> str:
    return base64.b64encode(value if isinstance(value, bytes) else str(value).encode()).decode()


def _site_key_id(raw: Any) -> str | None:
    if raw is None:
        return None
    try:
        return str(json.loads(_text(raw))["key_id"])
    except (ValueError, KeyError, TypeError):
        return None


def compress(source: Path, dest: Path) -> tuple[str, int]:
    """gzip SOURCE into DEST: the SHA-256 and size of what was written."""
    digest = hashlib.sha256()
    with open(source, "rb") as raw, open(dest, "wb") as out:
        hashing = _HashingWriter(out, digest)
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as packed:
            shutil.copyfileobj(raw, packed, CHUNK)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), dest.stat().st_size


class _HashingWriter:
    def __init__(self, out: IO[bytes], digest: Any) -> None:
        self._out = out
        self._digest = digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decompress(source: Path, dest: Path) -> None:
    try:
        with gzip.open(source, "rb") as packed, open(dest, "xb") as out:
            shutil.copyfileobj(packed, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
    except (OSError, EOFError) as e:
        with contextlib.suppress(FileNotFoundError):
            if not isinstance(e, FileExistsError):
                dest.unlink()
        raise BackupError(f"{source.name} cannot be decompressed: {e}") from None


# -- listing and retention ------------------------------------------------------------------


def manifests(target: Target) -> list[dict[str, Any]]:
    """The complete backups at TARGET, newest first."""
    found = []
    for name in target.names():
        if not name.endswith(MANIFEST_SUFFIX):
            continue
        try:
            manifest = json.loads(target.read(name))
        except (BackupError, ValueError):
            continue
        if isinstance(manifest, dict) and isinstance(manifest.get("created"), int | float):
            found.append(manifest)
    return sorted(found, key=lambda m: m["created"], reverse=True)


def prune(destination: Destination, now: float, keep_name: str = "") -> list[str]:
    """Delete backups beyond the newest KEEP, and those older than MAX_AGE (never the one
    just taken): the manifest first, so a half-deleted backup is never listed."""
    doomed = []
    for index, manifest in enumerate(manifests(destination.target)):
        name = str(manifest.get("name", ""))
        if name == keep_name or not name.startswith(PREFIX):
            continue
        too_many = index >= destination.keep
        too_old = destination.max_age > 0 and manifest["created"] < now - destination.max_age
        if too_many or too_old:
            doomed.append(name)
    for name in doomed:
        destination.target.delete(name + MANIFEST_SUFFIX)
        destination.target.delete(name + DATA_SUFFIX)
    # Data whose manifest never arrived (a crash, a failed upload) once a day has passed.
    names = destination.target.names()
    listed = {n[: -len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX)}
    for leaf in names:
        if not leaf.endswith(DATA_SUFFIX):
            continue
        orphan = leaf[: -len(DATA_SUFFIX)]
        if orphan not in listed and orphan != keep_name and _taken(orphan) < now - 86400:
            destination.target.delete(leaf)
            doomed.append(orphan)
    return doomed


def _taken(name: str) -> float:
    """When a backup named by new_name() was taken (epoch seconds; now if unreadable)."""
    stamp = name[len(PREFIX) :].split("-", 1)[0]
    try:
        return calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return time.time()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the daemon's service -------------------------------------------------------------------


class Backups:
    """Backups on the reactor: one at a time, on a thread of their own; the last outcome of
    each destination in metrics and log lines; scheduled runs claimed by one node."""

    def __init__(
        self,
        source: Snapshot,
        destinations: list[Destination],
        runner: Runner,
        store: Store,
        clock: IReactorTime,
        node: str,
    ) -> None:
        self.source = source
        self.destinations = destinations
        self._runner = runner
        self._store = store
        self._clock = clock
        self._node = node
        self._waiters: list[Deferred[Outcome]] | None = None  # a backup is running
        # Listings run beside backups (the reactor's pool unless set): never behind one.
        self.list_runner: Runner | None = None
        self.last_success: dict[str, float] = {}
        self.last_failure: dict[str, float] = {}
        self.last_size = 0.0
        self.last_duration = 0.0

    def register(self, metrics: Metrics) -> None:
        metrics.gauge(
            "pulumid_backup_last_success_timestamp_seconds",
            "When the last backup stored at a destination was taken (epoch seconds)",
            lambda: dict(self.last_success),
            "destination",
        )
        metrics.gauge(
            "pulumid_backup_last_failure_timestamp_seconds",
            "When a backup last failed at a destination (epoch seconds)",
            lambda: dict(self.last_failure),
            "destination",
        )
        metrics.gauge(
            "pulumid_backup_last_size_bytes",
            "Compressed size of the last backup",
            lambda: {"": self.last_size},
        )
        metrics.gauge(
            "pulumid_backup_last_duration_seconds",
            "How long the last backup took",
            lambda: {"": self.last_duration},
        )

    async def scheduled(self, interval: float) -> None:
        now = self._clock.seconds()
        # One node per interval: the claim outlives the run on purpose.
        if await self._store.claim("backup", self._node, now, now + interval * 0.9):
            await self.run()

    async def run(self) -> Outcome:
        """Take a backup now, or wait for the one being taken."""
        outcome: Outcome = await self._start()
        return outcome

    def _start(self) -> Deferred[Outcome]:
        waiter: Deferred[Outcome] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        running = self._runner.run(take, self.source, self.destinations, self._clock.seconds())
        running.addBoth(self._done)
        return waiter

    def _done(self, result: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        self._record(result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _record(self, result: Any) -> None:
        now = self._clock.seconds()
        if isinstance(result, Failure):
            for destination in self.destinations:
                self.last_failure[destination.label] = now
            log.error("backup failed: {error}", error=str(result.value))
            return
        outcome: Outcome = result
        self.last_size = float(outcome.manifest["size"])
        self.last_duration = float(outcome.manifest["duration_seconds"])
        for label in outcome.stored:
            self.last_success[label] = outcome.manifest["created"]
            log.info(
                "backup {name} stored at {destination} ({size} bytes, {stacks} stacks)",
                name=outcome.manifest["name"],
                destination=label,
                size=outcome.manifest["size"],
                stacks=outcome.manifest["stacks"],
            )
        for label, why in outcome.failed.items():
            self.last_failure[label] = now
            log.error("backup at {destination} failed: {error}", destination=label, error=why)

    async def list(self) -> list[dict[str, Any]]:
        def gather() -> list[dict[str, Any]]:
            found = []
            for destination in self.destinations:
                for manifest in manifests(destination.target):
                    found.append({**manifest, "destination": destination.label})
            return sorted(found, key=lambda m: m["created"], reverse=True)

        if self.list_runner is not None:
            listed: list[dict[str, Any]] = await self.list_runner.run(gather)
            return listed
        result: list[dict[str, Any]] = await deferToThread(gather)
        return result
