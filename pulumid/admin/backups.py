"""`pulumid-admin backups list|verify|restore`: what a destination holds, whether a backup is
whole and opens with a key, and a restore into a new database file (never over a live one).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pulumid.ops.backups import (
    DATA_SUFFIX,
    MANIFEST_SUFFIX,
    BackupError,
    decompress,
    describe_database,
    manifests,
    open_location,
    parse_destination,
    sha256_of,
)
from pulumid.secrets import crypto
from pulumid.secrets.keys import CANARY_CONTEXT, CANARY_PLAINTEXT, local_key_id


@dataclass
class Checked:
    manifest: dict[str, Any]
    database: Path  # the decompressed copy (in a scratch directory, or the restore target)
    facts: dict[str, Any]


def list_backups(destination: str, out: IO[str]) -> int:
    target = parse_destination(destination, 1, 0.0).target
    found = manifests(target)
    if not found:
        out.write(f"no backups at {target.label}\n")
        return 0
    out.write(f"{'name':<45} {'taken (UTC)':<21} {'size':>11} {'stacks':>7} {'updates':>8}\n")
    for m in found:
        out.write(
            f"{m['name']:<45} {m.get('created_at', ''):<21} {m.get('size', 0):>11} "
            f"{m.get('stacks', '?'):>7} {m.get('updates', '?'):>8}\n"
        )
    return 0


def check(location: str, dest: Path, keys: list[crypto.MasterKey]) -> Checked:
    """Fetch the backup at LOCATION, check its checksum, decompress it into DEST (which must
    not exist), check its integrity and that it matches its manifest; with KEYS, that each
    opens its canary in the backup."""
    target, name = open_location(location)
    try:
        manifest = json.loads(target.read(name + MANIFEST_SUFFIX))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise BackupError(f"{name}{MANIFEST_SUFFIX} is not a manifest")
    with tempfile.TemporaryDirectory(prefix="pulumid-restore-", dir=dest.parent) as work:
        packed = Path(work) / (name + DATA_SUFFIX)
        target.get(name + DATA_SUFFIX, packed)
        digest = sha256_of(packed)
        if digest != manifest.get("sha256"):
            raise BackupError(
                f"{name}{DATA_SUFFIX} fails its checksum: sha256 {digest}, the manifest says "
                f"{manifest.get('sha256')}"
            )
        decompress(packed, dest)
    os.chmod(dest, 0o600)
    facts = describe_database(dest)
    for field in ("schema_version", "stacks", "updates"):
        if facts[field] != manifest.get(field):
            raise BackupError(
                f"the database holds {field} {facts[field]}, the manifest says "
                f"{manifest.get(field)}"
            )
    for key in keys:
        _check_key(key, facts["keys"])
    return Checked(manifest, dest, facts)


def _check_key(key: crypto.MasterKey, keys: dict[str, Any]) -> None:
    key_id = local_key_id(key)
    canary = keys["canaries"].get(key_id)
    if canary is not None:
        try:
            opened = crypto.open_with_master(key, base64.b64decode(canary), CANARY_CONTEXT)
        except crypto.DecryptionError:
            opened = b""
        if opened != CANARY_PLAINTEXT:
            raise BackupError(f"the key {key_id} does not open its canary in this backup")
        return
    legacy = keys.get("legacy_canary")
    if legacy is not None and crypto.check_canary(key, base64.b64decode(legacy)):
        return
    raise BackupError(
        f"the given key ({key_id}) is not one this backup's database was used with; it "
        f"knows {', '.join(sorted(keys['canaries'])) or 'no key ids'}"
    )


def _say(out: IO[str], verb: str, checked: Checked) -> None:
    facts = checked.facts
    newest = facts.get("newest_update")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest)) if newest else "none"
    out.write(
        f"{verb} {checked.manifest['name']} (taken {checked.manifest.get('created_at')}, "
        f"pulumid {checked.manifest.get('pulumid_version')}, schema {facts['schema_version']})\n"
        f"  stacks: {facts['stacks']}\n  updates: {facts['updates']}\n"
        f"  resources: {facts['resources']}\n  newest update: {when}\n"
    )
    in_use = facts["keys"]["in_use"]
    for key_id, count in sorted(in_use.items()):
        out.write(f"  data keys wrapped by {key_id or '(the original master key)'}: {count}\n")


def verify(location: str, keys: list[crypto.MasterKey], out: IO[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="pulumid-verify-") as work:
        checked = check(location, Path(work) / "backup.db", keys)
        _say(out, "verified", checked)
    if keys:
        out.write("  the given key opens its canary\n")
    return 0


def restore(location: str, dest: Path, keys: list[crypto.MasterKey], out: IO[str]) -> int:
    if dest.exists() or dest.with_name(dest.name + "-wal").exists():
        raise BackupError(f"{dest} exists: restore into a new path (never over a database)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        checked = check(location, dest, keys)
    except BaseException:
        if dest.exists():
            dest.unlink()
        raise
    _say(out, "restored", checked)
    if keys:
        out.write("  the given key opens its canary\n")
    out.write(
        f"  into {dest}\nStart pulumid on it with the same master key (--database {dest}); "
        "for PostgreSQL, `pulumid-admin port --from` it into the new database first.\n"
    )
    return 0


def load_keys(paths: list[str]) -> list[crypto.MasterKey]:
    keys = []
    for path in paths:
        try:
            keys.append(crypto.MasterKey.from_hex(Path(path).read_text()))
        except OSError as e:
            raise BackupError(f"cannot read the key file {path}: {e.strerror}") from None
        except crypto.InvalidMasterKey as e:
            raise BackupError(f"{path}: {e}") from None
    return keys
