"""`pulumid-admin port`: copy a whole database to another engine, then verify the copy.

SOURCE and DEST are a SQLite file or a PostgreSQL DSN (as --database takes them), each with
its blobs inline or in S3 (as --blob-store takes them). Every table is copied row by row with
its ids, in one read snapshot of the source and one transaction on the destination: a failed
port leaves the destination as empty as it was, and can simply be run again (blobs it had
already written to the destination's object storage are orphans that blob collection removes).
Blobs are read through the source's blob store and written under new keys (or inline), never
shared: each database's blob collection deletes what its own rows do not reference.

Verification reads both sides through the Store seam, as the daemon would, and compares every
stack: its record, every stored state version (decompressed), its history, the events of each
update, journals and deltas of running updates; identities, access tokens and each
organization's audit trail; and the row counts of every table.

The tool is synchronous: the stores run on InlineRunner, so each Deferred has fired when the
call returns. Blob transfers, and the stacks being verified, run on a few threads at once.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import psycopg

from pulumid.admin.databases import (
    BLOB_THREADS,
    TABLES,
    AdminError,
    Database,
    PostgresDatabase,
    Side,
    Table,
    as_bytes,
    check_schema,
    open_blobs,
    open_database,
    pg_address,
    result,
)
from pulumid.config import is_postgres
from pulumid.errors import PulumidError
from pulumid.storage.blobs import parse_s3_url
from pulumid.storage.interface import Store
from pulumid.storage.records import AuditRecord, StackRecord, StateBlob, UpdateRecord
from pulumid.storage.split import REF, is_ref, new_key

ROW_BATCH = 1000
# Rows of a blob table fetched (and their blobs moved) at once: each may hold a state of many
# megabytes. Rows are written in batches of up to BLOB_ROWS, or fewer once they hold
# BATCH_BYTES (any table).
BLOB_FETCH = 8
BLOB_ROWS = 64
BATCH_BYTES = 32 * 1024 * 1024
# Stacks verified at once (each thread has its own connections; the blob store is shared).
VERIFY_THREADS = 8
VERIFY_CHUNK = 64
STACK_PAGE = 500
EVENT_PAGE = 1000
AUDIT_PAGE = 1000
PROGRESS_SECONDS = 5.0
# Differences printed in full; the rest are only counted.
SHOWN_DIFFERENCES = 200


# --------------------------------------------------------------------------------------------
# Copying


class Copier:
    def __init__(self, source: Side, dest: Side, out: IO[str]) -> None:
        self.source = source
        self.dest = dest
        self.out = out
        self.blobs_read = 0
        self.blobs_written = 0
        self.blob_bytes = 0
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()  # the blob counters, from the transfer threads

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> None:
        src, dst = self.source.db, self.dest.db
        meta = src.meta()
        floors = {table.name: src.id_floor(table.name) for table in TABLES if table.serial}
        pool = (
            ThreadPoolExecutor(BLOB_THREADS, thread_name_prefix="port-blobs")
            if self.source.blobs is not None or self.dest.blobs is not None
            else None
        )
        dst.begin_write()
        try:
            if not dst.is_empty():
                raise AdminError(f"{dst.where} got data while porting: stop whatever writes to it")
            replaced = [k for k, v in dst.meta().items() if k in meta and meta[k] != v]
            for key, value in meta.items():
                dst.upsert_meta(key, value)
            if replaced:
                self._say(f"  meta: replaced the destination's {', '.join(sorted(replaced))}")
            self._say(f"  {'meta':<18} {len(meta):>10} rows")
            for table in TABLES:
                self._copy(table, pool)
            for name, floor in floors.items():
                dst.raise_id_floor(name, floor)
            dst.commit()
        except BaseException as error:
            dst.rollback()
            if self.blobs_written and isinstance(error, Exception):
                raise AdminError(
                    f"{_reason(error)}\nnothing was committed to {dst.where}; the "
                    f"{self.blobs_written} blob(s) already written to {self.dest.blob_url} "
                    "are referenced by no row: a daemon on that blob store deletes them once "
                    "they are an hour old"
                ) from error
            raise
        finally:
            if pool is not None:
                pool.shutdown()

    def _copy(self, table: Table, pool: ThreadPoolExecutor | None) -> None:
        started = last = time.monotonic()
        count = size = 0
        flags = [table.columns.index(c) for c in table.flags]
        binary = [table.columns.index(c) for c in table.binary]
        to_pg = self.dest.db.kind == "postgres"
        limit = BLOB_ROWS if table.blob else ROW_BATCH
        pending: list[tuple[Any, ...]] = []
        pending_bytes = 0  # what the pending rows hold in memory
        for chunk in self.source.db.stream(table, BLOB_FETCH if table.blob else ROW_BATCH):
            rows = []
            for row in chunk:
                values = list(row)
                for i in flags:
                    values[i] = bool(values[i]) if to_pg else int(bool(values[i]))
                for i in binary:
                    if values[i] is not None:
                        values[i] = as_bytes(values[i])
                rows.append(tuple(values))
            if table.blob:
                # Resolved as fetched: a reference's bytes are only known once read.
                rows, moved = self._move_blobs(table, rows, pool)
                size += moved
            for row in rows:
                held = sum(len(row[i]) for i in binary if row[i] is not None)
                pending_bytes += held
                if not table.blob:
                    size += held
            pending.extend(rows)
            if len(pending) >= limit or pending_bytes >= BATCH_BYTES:
                self.dest.db.insert(table, pending)
                count += len(pending)
                pending, pending_bytes = [], 0
            if time.monotonic() - last > PROGRESS_SECONDS:
                last = time.monotonic()
                self._say(f"  {table.name:<18} {count:>10} rows so far ({_size(size)})")
        if pending:
            self.dest.db.insert(table, pending)
            count += len(pending)
        self.counts[table.name] = count
        took = time.monotonic() - started
        extra = f"  {_size(size)}" if table.binary else ""
        self._say(f"  {table.name:<18} {count:>10} rows{extra}  ({took:.1f}s)")

    def _move_blobs(
        self, table: Table, rows: list[tuple[Any, ...]], pool: ThreadPoolExecutor | None
    ) -> tuple[list[tuple[Any, ...]], int]:
        """ROWS with their blobs resolved and written where the destination keeps them, and
        the number of blob bytes moved."""
        assert table.blob is not None
        at = table.columns.index(table.blob)
        owner = table.columns.index(table.owner)

        def move(row: tuple[Any, ...]) -> tuple[tuple[Any, ...], int]:
            data: bytes = row[at]
            if is_ref(data):
                data = self._fetch(table, data)
            length = len(data)
            if self.dest.blobs is not None:
                data = self._put(table.kind, str(row[owner]), data)
            return (*row[:at], data, *row[at + 1 :]), length

        moved = [move(row) for row in rows] if pool is None else list(pool.map(move, rows))
        return [row for row, _ in moved], sum(length for _, length in moved)

    def _fetch(self, table: Table, ref: bytes) -> bytes:
        key = ref[len(REF) :].decode()
        if self.source.blobs is None:
            raise AdminError(
                f"{self.source.db.where}: a row of {table.name} references blob {key}: give "
                "the source's object storage with --from-blob-store s3://..."
            )
        data = result(self.source.blobs.get(key))
        if data is None:
            raise AdminError(
                f"{self.source.blob_url} has lost blob {key} (table {table.name}): restore it "
                "from a backup first"
            )
        with self._lock:
            self.blobs_read += 1
        return data

    def _put(self, kind: str, owner: str, data: bytes) -> bytes:
        assert self.dest.blobs is not None
        # BlobbedStore's key format (split.py), so its blob collection knows the key's age.
        key = new_key(kind, owner, time.time())
        result(self.dest.blobs.put(key, data))
        with self._lock:
            self.blobs_written += 1
            self.blob_bytes += len(data)
        return REF + key.encode()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


# --------------------------------------------------------------------------------------------
# Verifying


def _gunzip(data: bytes) -> bytes | str:
    """The decompressed bytes, or why they cannot be had."""
    if is_ref(data):
        return "an unresolved blob reference (give the side's blob store)"
    decompressor = zlib.decompressobj(47)
    try:
        out = decompressor.decompress(data) + decompressor.flush()
    except zlib.error as e:
        return f"not valid gzip ({e})"
    if not decompressor.eof:
        return "truncated gzip"
    return out


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


class Verifier:
    """Compares both sides stack by stack, several stacks at once."""

    def __init__(self, source: Side, dest: Side, out: IO[str]) -> None:
        self.source = source
        self.dest = dest
        self.out = out
        self.differences: list[str] = []
        self.totals = dict.fromkeys(
            ("stacks", "states", "updates", "events", "identities", "tokens", "audit"), 0
        )
        self._lock = threading.Lock()

    def _differ(self, text: str) -> None:
        with self._lock:
            if len(self.differences) < SHOWN_DIFFERENCES:
                self.out.write(f"  DIFFERENT: {text}\n")
                self.out.flush()
            self.differences.append(text)

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.totals[what] += n

    def run(self) -> list[str]:
        src_store, dst_store = self.source.store(), self.dest.store()
        self._tables()
        orgs = sorted(
            {row[0] for row in self.source.db.rows("SELECT DISTINCT org FROM stacks")}
            | {row[0] for row in self.dest.db.rows("SELECT DISTINCT org FROM stacks")}
        )
        last = time.monotonic()
        pairs = _merge(_stacks(src_store, orgs), _stacks(dst_store, orgs))
        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="port-verify") as pool:
            while chunk := list(itertools.islice(pairs, VERIFY_CHUNK)):
                for done in pool.map(self._pair, chunk):
                    assert done is None  # re-raises what a worker raised
                if time.monotonic() - last > PROGRESS_SECONDS:
                    last = time.monotonic()
                    self.out.write(f"  verified {self.totals['stacks']} stacks so far\n")
                    self.out.flush()
        self._unstarted(src_store, dst_store)
        self._identities(src_store, dst_store)
        self._tokens(src_store, dst_store)
        self._audit(src_store, dst_store)
        return self.differences

    def _pair(self, pair: tuple[StackRecord | None, StackRecord | None]) -> None:
        a, b = pair
        if a is None or b is None:
            present = a or b
            assert present is not None
            side = "destination" if a is None else "source"
            self._differ(f"{_label(present)}: only on the {side}")
            return
        # This thread's stores: connections are not shared between threads.
        self._stack(self.source.store(), self.dest.store(), a, b)
        self._count("stacks")

    def _tables(self) -> None:
        src, dst = self.source.db, self.dest.db
        if src.meta() != dst.meta():
            keys = sorted(
                k
                for k in set(src.meta()) | set(dst.meta())
                if src.meta().get(k) != dst.meta().get(k)
            )
            self._differ(f"meta: {', '.join(keys)} differ")
        for table in TABLES:
            a = src.scalar(f"SELECT COUNT(*) FROM {table.name}")
            b = dst.scalar(f"SELECT COUNT(*) FROM {table.name}")
            if a != b:
                self._differ(f"table {table.name}: {a} rows on the source, {b} on the destination")
        order = "SELECT org, project, name, stack_id FROM stack_aliases ORDER BY org, project, name"
        if src.rows(order) != dst.rows(order):
            self._differ("stack_aliases: the aliases of renamed stacks differ")

    def _stack(self, src: Store, dst: Store, a: StackRecord, b: StackRecord) -> None:
        label = _label(a)
        for field in fields(StackRecord):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if x != y:
                self._differ(f"{label}: {field.name} is {x!r} on the source, {y!r} on the dest")
        if result(src.get_stack_key(a.id)) != result(dst.get_stack_key(b.id)):
            self._differ(f"{label}: the secrets key differs")
        for version in range(max(a.version, b.version) + 1):
            self._state(label, version, result(src.get_state(a.id, version)), dst, b.id)
        history_a: list[UpdateRecord] = result(src.list_history(a.id, 0, 0))
        history_b: list[UpdateRecord] = result(dst.list_history(b.id, 0, 0))
        history_a.sort(key=_history_order)
        history_b.sort(key=_history_order)
        if len(history_a) != len(history_b):
            self._differ(
                f"{label}: {len(history_a)} history entries on the source, "
                f"{len(history_b)} on the destination"
            )
        for x, y in zip(history_a, history_b, strict=False):
            self._update(label, src, dst, x, y)

    def _state(
        self, label: str, version: int, a: StateBlob | None, dst: Store, stack_id: int
    ) -> None:
        b = result(dst.get_state(stack_id, version))
        where = f"{label}: version {version}"
        if a is None or b is None:
            if a is not b:
                side = "destination" if a is None else "source"
                self._differ(f"{where}: the state is only on the {side}")
            return
        self._count("states")
        if a.resource_count != b.resource_count:
            self._differ(f"{where}: resource_count {a.resource_count} != {b.resource_count}")
        if a.gzipped == b.gzipped and not is_ref(a.gzipped):
            return
        x, y = _gunzip(a.gzipped), _gunzip(b.gzipped)
        if isinstance(x, str):
            self._differ(f"{where}: cannot compare: the source's state is {x}")
        elif isinstance(y, str):
            self._differ(f"{where}: the state differs: the destination's is {y}")
        elif x != y:
            self._differ(
                f"{where}: the exports differ ({len(x)} and {len(y)} bytes, first difference "
                f"at byte {_first_difference(x, y)})"
            )

    def _update(self, label: str, src: Store, dst: Store, a: UpdateRecord, b: UpdateRecord) -> None:
        where = f"{label}: update {a.id}"
        self._count("updates")
        for field in fields(UpdateRecord):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if x != y:
                self._differ(f"{where}: {field.name} is {x!r} on the source, {y!r} on the dest")
                return
        events_a, events_b = _events(src, a.id), _events(dst, b.id)
        self._count("events", events_a[0])
        if events_a[0] != events_b[0]:
            self._differ(f"{where}: {events_a[0]} events on the source, {events_b[0]} on the dest")
        elif events_a != events_b:
            self._differ(f"{where}: the events differ")
        if a.status == "running":
            if result(src.get_journal(a.id)) != result(dst.get_journal(b.id)):
                self._differ(f"{where}: the journal differs")
            if result(src.get_deltas(a.id)) != result(dst.get_deltas(b.id)):
                self._differ(f"{where}: the checkpoint deltas differ")

    def _unstarted(self, src: Store, dst: Store) -> None:
        """Updates created but not started are in no history: compared one by one."""
        query = "SELECT id FROM updates WHERE status = 'not-started' ORDER BY id"
        ids = {row[0] for row in self.source.db.rows(query)}
        ids |= {row[0] for row in self.dest.db.rows(query)}
        for update_id in sorted(ids):
            if result(src.get_update(update_id)) != result(dst.get_update(update_id)):
                self._differ(f"not-started update {update_id} differs")

    def _identities(self, src: Store, dst: Store) -> None:
        a = {i.login: i for i in result(src.list_identities())}
        b = {i.login: i for i in result(dst.list_identities())}
        self._count("identities", len(a))
        self._by_key("identity", a, b)

    def _tokens(self, src: Store, dst: Store) -> None:
        a = {t.id: t for t in result(src.list_tokens(None))}
        b = {t.id: t for t in result(dst.list_tokens(None))}
        self._count("tokens", len(a))
        self._by_key("access token", a, b)

    def _by_key(self, what: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        """Records of both sides by their key: each one missing or different is named."""
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if x is None or y is None:
                side = "destination" if x is None else "source"
                self._differ(f"{what} {key}: only on the {side}")
                continue
            for field in fields(x):
                if getattr(x, field.name) != getattr(y, field.name):
                    self._differ(f"{what} {key}: {field.name} differs")

    def _audit(self, src: Store, dst: Store) -> None:
        """Each organization's audit trail, page by page, newest first (ids are kept)."""
        query = "SELECT DISTINCT org FROM audit_events"
        orgs = {row[0] for row in self.source.db.rows(query)}
        orgs |= {row[0] for row in self.dest.db.rows(query)}
        for org in sorted(orgs):
            before = 0
            while True:
                a = result(src.list_audit_events(org, None, None, None, None, before, AUDIT_PAGE))
                b = result(dst.list_audit_events(org, None, None, None, None, before, AUDIT_PAGE))
                self._count("audit", len(a))
                if a != b:
                    self._differ(f"audit events of {org}: {_first_audit_difference(a, b)}")
                    break
                if len(a) < AUDIT_PAGE:
                    break
                before = a[-1].id


def _first_audit_difference(a: list[AuditRecord], b: list[AuditRecord]) -> str:
    for x, y in zip(a, b, strict=False):
        if x.id != y.id:
            newer, side = (x, "source") if x.id > y.id else (y, "destination")
            return f"event {newer.id} is only on the {side}"
        if x != y:
            return f"event {x.id} differs"
    longer, side = (a, "source") if len(a) > len(b) else (b, "destination")
    return f"event {longer[min(len(a), len(b))].id} is only on the {side}"


def _history_order(update: UpdateRecord) -> tuple[int, float, str]:
    """list_history's order, and for entries of one version and creation time (which it
    leaves in no defined order) the id."""
    return -update.version, -update.created, update.id


def _label(stack: StackRecord) -> str:
    return f"{stack.org}/{stack.project}/{stack.name} (stack id {stack.id})"


def _stacks(store: Store, orgs: list[str]) -> Iterator[StackRecord]:
    after = 0
    while orgs:
        page = result(store.stacks_by_id(orgs, after, STACK_PAGE))
        yield from page
        if len(page) < STACK_PAGE:
            return
        after = page[-1].id


def _merge(
    a: Iterator[StackRecord], b: Iterator[StackRecord]
) -> Iterator[tuple[StackRecord | None, StackRecord | None]]:
    """Pairs of stacks with the same id from two id-ordered streams (None where absent)."""
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x.id < y.id):
            yield x, None
            x = next(a, None)
        elif x is None or y.id < x.id:
            yield None, y
            y = next(b, None)
        else:
            yield x, y
            x, y = next(a, None), next(b, None)


def _events(store: Store, update_id: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    count, after = 0, -1
    while True:
        page = result(store.get_events(update_id, after, EVENT_PAGE))
        for event in page:
            digest.update(b"%d:%d:" % (event.sequence, len(event.data)))
            digest.update(event.data)
        count += len(page)
        if len(page) < EVENT_PAGE:
            return count, digest.hexdigest()
        after = page[-1].sequence


# --------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class PortOptions:
    source: str
    dest: str
    source_blobs: str = "inline"
    dest_blobs: str = "inline"
    allow_running: bool = False
    verify_only: bool = False
    # Off for backups: their source goes on changing after the snapshot was copied.
    verify: bool = True


def _same_sqlite(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.exists() and pb.exists() and pa.samefile(pb)
    except OSError:
        return False


def _check_distinct(options: PortOptions) -> None:
    both_pg = is_postgres(options.source) and is_postgres(options.dest)
    if not is_postgres(options.source) and not is_postgres(options.dest):
        if _same_sqlite(options.source, options.dest):
            raise AdminError("--from and --to are the same database")
    if both_pg:
        a, b = pg_address(options.source), pg_address(options.dest)
        if a is not None and a == b:
            raise AdminError("--from and --to are the same database")
    if options.source_blobs != "inline" and options.dest_blobs != "inline":
        try:
            a_loc, b_loc = parse_s3_url(options.source_blobs), parse_s3_url(options.dest_blobs)
        except ValueError as e:
            raise AdminError(str(e)) from None
        if (a_loc.bucket, a_loc.prefix) == (b_loc.bucket, b_loc.prefix):
            raise AdminError(
                "--from-blob-store and --to-blob-store are the same bucket and prefix: give the "
                "destination its own prefix (each database's blob collection deletes the blobs "
                "its rows do not reference, so two databases must not share one)"
            )


def _running(db: Database) -> list[str]:
    rows = db.rows(
        "SELECT s.org, s.project, s.name, u.id FROM updates u JOIN stacks s ON s.id = u.stack_id "
        "WHERE u.status = 'running' ORDER BY s.org, s.project, s.name"
    )
    return [f"{org}/{project}/{name} (update {uid})" for org, project, name, uid in rows]


def port(options: PortOptions, out: IO[str]) -> int:
    """Copy (unless verify_only) and verify: 0 when both sides are equal, 1 when not.
    AdminError for everything that stops it before a verdict."""
    _check_distinct(options)
    opened: list[Callable[[], None]] = []
    try:
        source_db = open_database(options.source, create=False, read_only=True)
        opened.append(source_db.close)
        dest_db = open_database(options.dest, create=not options.verify_only, read_only=False)
        opened.append(dest_db.close)
        if isinstance(source_db, PostgresDatabase) and isinstance(dest_db, PostgresDatabase):
            if dest_db.sees_session(source_db.session()):
                raise AdminError("--from and --to are the same database")
        source_blobs = open_blobs(options.source_blobs)
        if source_blobs is not None:
            opened.append(source_blobs.close)
        dest_blobs = open_blobs(options.dest_blobs)
        if dest_blobs is not None:
            opened.append(dest_blobs.close)
        source = Side(source_db, source_blobs, options.source_blobs)
        dest = Side(dest_db, dest_blobs, options.dest_blobs)
        check_schema(source_db)
        check_schema(dest_db)
        out.write(f"source:      {source.label}\ndestination: {dest.label}\n")
        if not options.verify_only:
            _copy(source, dest, options, out)
        if not options.verify:
            out.flush()
            return 0
        started = time.monotonic()
        out.write("verifying every stack through the store...\n")
        out.flush()
        verifier = Verifier(source, dest, out)
        differences = verifier.run()
        totals = verifier.totals
        out.write(
            f"verified {totals['stacks']} stacks, {totals['states']} state versions, "
            f"{totals['updates']} updates, {totals['events']} events, "
            f"{totals['identities']} identities, {totals['tokens']} access tokens, "
            f"{totals['audit']} audit events in {time.monotonic() - started:.1f}s: "
        )
        if differences:
            out.write(f"{len(differences)} DIFFERENCES (see above)\n")
            out.flush()
            return 1
        out.write("the destination matches the source\n")
        out.flush()
        return 0
    except (PulumidError, psycopg.Error, sqlite3.Error) as e:
        raise AdminError(_reason(e)) from e
    finally:
        for close in reversed(opened):
            close()


def _reason(error: Exception) -> str:
    if isinstance(error, PulumidError):
        return error.message
    if isinstance(error, psycopg.Error | sqlite3.Error):
        return f"database error: {error}"
    return str(error)


def _copy(source: Side, dest: Side, options: PortOptions, out: IO[str]) -> None:
    if not dest.db.is_empty():
        raise AdminError(
            f"{dest.db.where} already has stacks or updates (or identities, access tokens, "
            "audit events): port only into a new, empty database (drop and recreate it, or "
            "give another one)"
        )
    source.db.begin_snapshot()
    try:
        running = _running(source.db)
        if running and not options.allow_running:
            shown = "\n  ".join(running[:20])
            raise AdminError(
                f"{len(running)} update(s) are running on the source:\n  {shown}\n"
                "wait for them to end and stop the daemon, or pass --allow-running to port "
                "them as running: their leases then expire on the destination, which ends "
                "them as failed (keeping the progress they saved)"
            )
        if running:
            out.write(
                f"porting {len(running)} running update(s) as running: they expire on the "
                "destination\n"
            )
        out.write("copying...\n")
        out.flush()
        started = time.monotonic()
        copier = Copier(source, dest, out)
        copier.run()
    finally:
        source.db.end_snapshot()
    counts = copier.counts
    blobs = ""
    if copier.blobs_read:
        blobs += f", {copier.blobs_read} blobs read from {source.blob_url}"
    if copier.blobs_written:
        blobs += (
            f", {copier.blobs_written} blobs ({_size(copier.blob_bytes)}) written to "
            f"{dest.blob_url}"
        )
    out.write(
        f"copied {counts['stacks']} stacks, {counts['states']} state versions, "
        f"{counts['updates']} updates, {counts['events']} events{blobs} "
        f"in {time.monotonic() - started:.1f}s\n"
    )
    out.flush()
