"""Backups, restore and key rotation at size: a real daemon with STACKS stacks of RESOURCES
resources each (states shaped like the CLI's, a data key per stack), then

- backup    POST /api/admin/backups (VACUUM INTO, gzip, SHA-256, manifest, into a
            directory) against the baseline of copying and gzipping the idle database file
            in this process (the least any compressed backup costs);
- restore   `pulumid-admin backups restore` (fetch, checksum, gunzip, integrity check)
            against the baseline of gunzipping the same file;
- rotation  the daemon restarted with a new master key (the old one as a previous key),
            POST /api/admin/keys/rotate re-wrapping every data key; with --kms also local ->
            AWS KMS (a real local-kms).

    python -m benchmarks.backups [--stacks 1000] [--resources 100] [--payload 1024] [--kms]
"""

from __future__ import annotations

import argparse
import gzip
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, BenchmarkError, Server, free_port, new_token, pulumid_server
from benchmarks.micro import (
    ORG,
    PROJECT,
    Client,
    SpannedDeployment,
    begin_update,
    checkpoint,
    complete,
    create_stack,
    resources,
)

THREADS = 4


@contextmanager
def daemon(workdir: Path, port: int, token: str, key: str, *args: str) -> Iterator[Server]:
    server = pulumid_server(
        workdir, port=port, token=token, master_key=key, org=ORG, extra_args=args
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def state_body(stack: str, count: int, payload: int) -> bytes:
    """A checkpoint whose items carry PAYLOAD bytes of random hex each: real outputs (ids,
    ARNs, certificates) compress far less than the micro benchmark's repeated units."""
    items = resources(stack, count, 0)
    for item in items[2:]:
        item["outputs"]["payload"] = secrets.token_hex(payload // 2)
    return SpannedDeployment.build(stack, items).text


def populate(port: int, token: str, stacks: int, resources: int, payload: int) -> None:
    names = [f"s{i:05d}" for i in range(stacks)]

    def work(share: list[str]) -> None:
        client = Client(port, token)
        try:
            for stack in share:
                create_stack(client, stack)
                update = begin_update(client, stack)
                body = gzip.compress(state_body(stack, resources, payload), 1)
                checkpoint(client, update, body)
                complete(client, update)
                client.ok(
                    "POST",
                    f"/api/stacks/{ORG}/{PROJECT}/{stack}/encrypt",
                    json.dumps({"plaintext": "aHVudGVyMg=="}).encode(),
                )
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(names[i::THREADS],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def post(port: int, token: str, path: str) -> tuple[float, Any]:
    client = Client(port, token)
    try:
        response = client.ok("POST", path, b"")
        return response.seconds, response.json()
    finally:
        client.close()


def rotated(port: int, token: str, timeout: float = 600.0) -> Any:
    """The keys view once the rotation the daemon began at start has run (it reports how
    long it took on the daemon's clock)."""
    client = Client(port, token)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            keys = client.ok("GET", "/api/admin/keys").json()
            if keys["lastRotation"] is not None:
                return keys
            time.sleep(0.2)
    finally:
        client.close()
    raise BenchmarkError("the rotation did not finish")


def baseline_backup(database: Path, work: Path) -> float:
    started = time.perf_counter()
    copy = work / "baseline.db"
    shutil.copyfile(database, copy)
    with open(copy, "rb") as raw, gzip.open(work / "baseline.db.gz", "wb", 6) as packed:
        shutil.copyfileobj(raw, packed, 1024 * 1024)
    return time.perf_counter() - started


def baseline_restore(packed: Path, work: Path) -> float:
    started = time.perf_counter()
    with gzip.open(packed, "rb") as source, open(work / "baseline-restored.db", "wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pulumid-bench-backups-") as tmp:
        work = Path(tmp)
        backups = work / "backups"
        port, token = free_port(), new_token()
        first, second = secrets.token_hex(32), secrets.token_hex(32)
        database = work / "pulumid.sqlite"
        with daemon(work, port, token, first, "--backup-to", str(backups)):
            started = time.perf_counter()
            populate(port, token, args.stacks, args.resources, args.payload)
            lines.append(
                f"populated {args.stacks} stacks x {args.resources} resources "
                f"({args.payload}-byte payloads) in {time.perf_counter() - started:.1f} s"
            )
            wall, taken = post(port, token, "/api/admin/backups")
        manifest = taken["backup"]
        base = baseline_backup(database, work)
        lines.append(
            f"backup: {wall:.2f} s wall ({manifest['duration_seconds']:.2f} s on the daemon's "
            f"thread), {manifest['size'] / 1e6:.1f} MB compressed from "
            f"{manifest['database_size'] / 1e6:.1f} MB; baseline copy+gzip {base:.2f} s; "
            f"ratio {wall / base:.2f}"
        )
        location = backups / f"{manifest['name']}.json"
        started = time.perf_counter()
        restored = subprocess.run(
            [sys.executable, "-m", "pulumid.admin", "backups", "restore", str(location),
             "--to", str(work / "restored" / "db.sqlite")],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        restore_time = time.perf_counter() - started
        if restored.returncode != 0:
            raise BenchmarkError(f"restore failed: {restored.stderr}")
        base = baseline_restore(backups / manifest["file"], work)
        lines.append(
            f"restore: {restore_time:.2f} s (checksum, gunzip, integrity check, counts); "
            f"baseline gunzip {base:.2f} s; ratio {restore_time / base:.2f}"
        )
        old_key = work / "old.key"
        old_key.write_text(first)
        with daemon(work, port, token, second, "--previous-secrets-keys", f"file:{old_key}"):
            keys = rotated(port, token)
        moved = {k["keyId"]: k["stacks"] for k in keys["keys"]}
        seconds = keys["lastRotation"]["seconds"]
        lines.append(
            f"rotation to a new master key: {seconds:.2f} s for {args.stacks} stacks "
            f"({seconds / args.stacks * 1000:.2f} ms per stack); keys now {moved}"
        )
        if args.kms:
            lines.append(rotate_to_kms(work, port, token, second, args.stacks))
    return lines


def rotate_to_kms(work: Path, port: int, token: str, key: str, stacks: int) -> str:
    from tests.local_kms import local_kms

    with local_kms(work / "kms") as kms:
        arn = kms.create_key()
        spec = f"awskms://{arn}?region={kms.region}&endpoint={kms.endpoint}"
        server = pulumid_server(
            work,
            port=port,
            token=token,
            master_key=key,
            org=ORG,
            extra_args=["--secrets-key", spec, "--previous-secrets-keys", "local"],
            env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
        )
        server.start()
        try:
            keys = rotated(port, token)
        finally:
            server.stop()
    moved = {k["keyId"].split("/")[-1]: k["stacks"] for k in keys["keys"]}
    seconds = keys["lastRotation"]["seconds"]
    return (
        f"rotation local -> AWS KMS (local-kms): {seconds:.2f} s for {stacks} stacks "
        f"({seconds / stacks * 1000:.2f} ms per stack); keys now {moved}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backups", description=__doc__)
    parser.add_argument("--stacks", type=int, default=1000)
    parser.add_argument("--resources", type=int, default=100)
    parser.add_argument("--payload", type=int, default=1024, help="bytes per resource output")
    parser.add_argument("--kms", action="store_true", help="also rotate to a local-kms key")
    args = parser.parse_args(argv)
    try:
        for line in run(args):
            print(line, flush=True)
    except BenchmarkError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
