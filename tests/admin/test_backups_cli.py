"""`pulumid-admin backups list|verify|restore` on backups taken by pulumid.ops.backups.take
from a database built through the real Backend: directories and S3 (a real MinIO)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pulumid.admin.__main__ import main
from pulumid.ops.backups import (
    DATA_SUFFIX,
    MANIFEST_SUFFIX,
    Destination,
    DirectoryTarget,
    Snapshot,
    parse_destination,
    take,
)
from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import local_key_id
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner
from tests.admin.test_port import MASTER_KEY, ORG, START, Source, build_source, exports_of
from tests.minio import s3_url

REPO = Path(__file__).resolve().parents[2]
NOW = START + 1000.0
_sync = SynchronousTestCase()


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["backups", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def refused(*args: str) -> str:
    code, out, err = run(*args)
    assert code == 2, f"{args} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert err.startswith(f"pulumid-admin backups {args[0]}: "), err
    return err


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return build_source(tmp_path_factory.mktemp("source") / "pulumid.sqlite", running=False)


def backup_to(source: Source, folder: Path, now: float = NOW) -> dict[str, Any]:
    outcome = take(Snapshot(str(source.path)), [Destination(DirectoryTarget(folder), 14, 0)], now)
    assert outcome.stored == [str(folder)], outcome.failed
    return outcome.manifest


@pytest.fixture
def backup(source: Source, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A fresh backup in a directory of its own: its manifest path and the manifest."""
    folder = tmp_path / "bk"
    manifest = backup_to(source, folder)
    return folder / (manifest["name"] + MANIFEST_SUFFIX), manifest


def key_file(path: Path, hex_key: str) -> str:
    path.write_text(hex_key + "\n")
    return str(path)


def stack_names(path: Path) -> list[str]:
    store = SQLiteStore.open(path, InlineRunner())
    try:
        stacks = _sync.successResultOf(store.list_stacks([ORG], None, None, None, None, 100))
        return sorted(str(s.ref) for s in stacks)
    finally:
        store.close()


# -- list -----------------------------------------------------------------------------------


def test_list_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        assert run("list", str(folder)) == (0, f"no backups at {folder}\n", "")
    err = refused("list", f"{tmp_path}?keep=0")
    assert "keep must be a whole number" in err


def test_list_newest_first(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "bk"
    taken = [backup_to(source, folder, NOW + 3600 * n) for n in range(3)]
    (folder / (taken[0]["name"] + ".orphan" + DATA_SUFFIX)).write_bytes(b"")
    code, out, err = run("list", str(folder))
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["name", "taken", "(UTC)", "size", "stacks", "updates"]
    assert len(rows) == 3
    for row, manifest in zip(rows, reversed(taken), strict=True):
        assert row.split() == [
            manifest["name"],
            manifest["created_at"],
            str(manifest["size"]),
            "6",
            str(manifest["updates"]),
        ]
    assert [r.split()[1] for r in rows] == [
        "2023-11-15T00:30:00Z",
        "2023-11-14T23:30:00Z",
        "2023-11-14T22:30:00Z",
    ]


# -- verify ---------------------------------------------------------------------------------


def test_verify(backup: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, manifest = backup
    code, out, err = run("verify", str(path))
    assert (code, err) == (0, ""), err
    newest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest["newest_update"]))
    assert out.splitlines()[:6] == [
        f"verified {manifest['name']} (taken 2023-11-14T22:30:00Z, pulumid "
        f"{manifest['pulumid_version']}, schema {manifest['schema_version']})",
        "  stacks: 6",
        f"  updates: {manifest['updates']}",
        f"  resources: {manifest['resources']}",
        f"  newest update: {newest}",
        f"  data keys wrapped by {local_key_id(MasterKey.from_hex(MASTER_KEY))}: 1",
    ]
    # The data file names the same backup; the scratch copy is gone again.
    data = path.with_name(manifest["file"])
    assert run("verify", str(data)) == (0, out, "")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, data.name])

    for name, words in [
        (tmp_path / "bk" / "pulumid-backup-nope.json", "does not exist"),
        (tmp_path / "bk" / "notes.txt", "is not a backup"),
    ]:
        assert words in refused("verify", str(name))


def test_verify_refuses_a_damaged_data_file(backup: tuple[Path, dict[str, Any]]) -> None:
    path, manifest = backup
    data = path.with_name(manifest["file"])
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    err = refused("verify", str(path))
    assert f"{manifest['file']} fails its checksum" in err
    assert f"the manifest says {manifest['sha256']}" in err
    # A truncated file, its checksum fixed up to match: gzip itself refuses it.
    data.write_bytes(bytes(raw[: len(raw) // 2]))
    forged = {**manifest, "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    path.write_text(json.dumps(forged))
    assert "cannot be decompressed" in refused("verify", str(path))


def test_verify_refuses_a_manifest_that_does_not_match(
    backup: tuple[Path, dict[str, Any]],
) -> None:
    path, manifest = backup
    path.write_text(json.dumps({**manifest, "stacks": manifest["stacks"] + 1}))
    err = refused("verify", str(path))
    assert "the database holds stacks 6, the manifest says 7" in err
    path.write_text(json.dumps({**manifest, "updates": 0}))
    assert f"updates {manifest['updates']}, the manifest says 0" in refused("verify", str(path))
    path.write_text("{not json")
    assert "is not a manifest" in refused("verify", str(path))


def test_verify_refuses_a_manifest_that_is_not_an_object(
    backup: tuple[Path, dict[str, Any]],
) -> None:
    path, _manifest = backup
    path.write_text("[]")
    assert "is not a manifest" in refused("verify", str(path))


def test_verify_with_master_keys(backup: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _manifest = backup
    right = key_file(tmp_path / "right.key", MASTER_KEY)
    code, out, err = run("verify", str(path), "--master-key-file", right)
    assert (code, err) == (0, "")
    assert out.endswith("  the given key opens its canary\n")

    other = MasterKey.from_hex("7a" * 32)
    wrong = key_file(tmp_path / "wrong.key", "7a" * 32)
    err = refused("verify", str(path), "--master-key-file", wrong)
    known = local_key_id(MasterKey.from_hex(MASTER_KEY))
    assert (
        f"the given key ({local_key_id(other)}) is not one this backup's database was used "
        f"with; it knows {known}"
    ) in err
    # Every given key must open its canary.
    assert "is not one" in refused(
        "verify", str(path), "--master-key-file", right, "--master-key-file", wrong
    )

    assert "cannot read the key file" in refused(
        "verify", str(path), "--master-key-file", str(tmp_path / "absent.key")
    )
    short = key_file(tmp_path / "short.key", "abc")
    assert "64 hex characters" in refused("verify", str(path), "--master-key-file", short)


def test_verify_a_canary_the_key_does_not_open(source: Source, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.sqlite"
    shutil.copyfile(source.path, damaged)
    key_id = local_key_id(MasterKey.from_hex(MASTER_KEY))
    with closing(sqlite3.connect(damaged)) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = ?", (os.urandom(60), f"key_canary:{key_id}")
        )
        conn.commit()
    outcome = take(Snapshot(str(damaged)), [Destination(DirectoryTarget(tmp_path), 9, 0)], NOW)
    manifest = tmp_path / (outcome.manifest["name"] + MANIFEST_SUFFIX)
    right = key_file(tmp_path / "right.key", MASTER_KEY)
    assert run("verify", str(manifest))[0] == 0
    err = refused("verify", str(manifest), "--master-key-file", right)
    assert f"the key {key_id} does not open its canary in this backup" in err


# -- restore --------------------------------------------------------------------------------


def test_restore_into_a_new_path(
    source: Source, backup: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, manifest = backup
    dest = tmp_path / "restored" / "deeper" / "pulumid.sqlite"
    right = key_file(tmp_path / "right.key", MASTER_KEY)
    code, out, err = run("restore", str(path), "--to", str(dest), "--master-key-file", right)
    assert (code, err) == (0, ""), err
    newest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest["newest_update"]))
    assert out.startswith(f"restored {manifest['name']} (taken 2023-11-14T22:30:00Z")
    for line in (
        "  stacks: 6",
        f"  updates: {manifest['updates']}",
        f"  newest update: {newest}",
        f"  into {dest}",
    ):
        assert line + "\n" in out, (line, out)
    assert f"--database {dest}" in out
    assert os.stat(dest).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pulumid.sqlite"]

    assert stack_names(dest) == sorted(source.exports)
    assert exports_of(dest, source.exported_at) == source.exports


def test_restore_never_over_a_database(backup: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _manifest = backup
    existing = tmp_path / "live.sqlite"
    existing.write_bytes(b"the live database")
    before = os.stat(existing)
    err = refused("restore", str(path), "--to", str(existing))
    assert f"{existing} exists: restore into a new path" in err
    assert existing.read_bytes() == b"the live database"
    assert os.stat(existing).st_mtime_ns == before.st_mtime_ns
    # A database whose main file is gone but whose WAL is not: refused too.
    wal_only = tmp_path / "half.sqlite"
    (tmp_path / "half.sqlite-wal").write_bytes(b"wal")
    assert "exists" in refused("restore", str(path), "--to", str(wal_only))
    assert not wal_only.exists()


def test_a_failed_restore_leaves_nothing(
    backup: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, manifest = backup
    path.write_text(json.dumps({**manifest, "stacks": 99}))
    dest = tmp_path / "restored.sqlite"
    assert "the manifest says 99" in refused("restore", str(path), "--to", str(dest))
    assert not dest.exists()
    path.write_text(json.dumps(manifest))
    wrong = key_file(tmp_path / "wrong.key", "7a" * 32)
    assert "is not one" in refused("restore", str(path), "--to", str(dest), "--master-key-file",
                                   wrong)  # fmt: skip
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pulumid-")) == []
    assert run("restore", str(path), "--to", str(dest))[0] == 0


# -- S3 -------------------------------------------------------------------------------------


def test_list_verify_and_restore_from_s3(
    source: Source, minio_endpoint: str, tmp_path: Path
) -> None:
    prefix = "cli-" + uuid.uuid4().hex[:12]
    url = s3_url(minio_endpoint, prefix)
    dest = parse_destination(url, 5, 0.0)
    taken = [take(Snapshot(str(source.path)), [dest], NOW + 60 * n).manifest for n in range(2)]
    code, out, err = run("list", url)
    assert (code, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        taken[1]["name"],
        taken[0]["name"],
    ]
    base, _, query = url.partition("?")
    location = f"{base}/{taken[0]['name']}{MANIFEST_SUFFIX}?{query}"
    code, out, err = run("verify", location)
    assert (code, err) == (0, ""), err
    assert f"verified {taken[0]['name']}" in out

    restored = tmp_path / "from-s3.sqlite"
    data_location = f"{base}/{taken[0]['name']}{DATA_SUFFIX}?{query}"
    code, out, err = run("restore", data_location, "--to", str(restored))
    assert (code, err) == (0, ""), err
    assert "  stacks: 6\n" in out
    assert stack_names(restored) == sorted(source.exports)

    missing = f"{base}/pulumid-backup-nope{MANIFEST_SUFFIX}?{query}"
    assert "failed (NoSuchKey)" in refused("restore", missing, "--to", str(tmp_path / "x.db"))
    assert not (tmp_path / "x.db").exists()


# -- the console script ---------------------------------------------------------------------


def test_console_script_help() -> None:
    script = REPO / ".venv" / "bin" / "pulumid-admin"
    done = subprocess.run(
        [str(script), "backups", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for words in ("list DEST", "verify BACKUP", "restore BACKUP --to F", "--backup-to"):
        assert words in done.stdout, done.stdout
    done = subprocess.run(
        [str(script), "backups", "restore", "x.json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--to" in done.stderr, done.stderr
