"""Key rotation with the real CLI: a new local master key with the daemon killed part way
through the re-wrapping, then local -> AWS KMS (a real local-kms) -> local. At every stage
every stack's secrets (config secrets and secret outputs) still decrypt, `pulumi up` runs,
and a retired key is no longer needed while the one that went is refused."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import local_key_id
from tests.e2e.helpers import Daemon, PulumiCLI, wait_until
from tests.local_kms import LocalKMS, local_kms

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]

STACKS = 10
UP = ("up", "--yes", "--skip-preview")


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[LocalKMS]:
    with local_kms(tmp_path / "kms") as server:
        yield server


def key_counts(daemon: Daemon) -> dict[str, int]:
    with sqlite3.connect(daemon.db_path) as conn:
        rows = conn.execute("SELECT key_id, COUNT(*) FROM stack_keys GROUP BY key_id")
        return {str(k): int(n) for k, n in rows.fetchall()}


def rotate(daemon: Daemon) -> dict[str, int]:
    """Rotate now (rather than at the next minute's tick): the keys view afterwards."""
    body = daemon.api_ok("POST", "/api/admin/keys/rotate")
    return {k["keyId"]: k["stacks"] for k in body["keys"] if k["stacks"]}


def all_secrets_decrypt(cli: PulumiCLI, p: Path) -> None:
    for i in range(STACKS):
        cli.run("stack", "select", f"acme/s{i}", cwd=p)
        assert cli.run("config", "get", "pw", cwd=p).stdout.strip() == f"hunter{i}"
        values = cli.json("config", "--show-secrets", cwd=p)
        assert values["p:pw"]["value"] == f"hunter{i}", values
    cli.run("stack", "select", "acme/s0", cwd=p)
    outputs = cli.json("stack", "output", "--show-secrets", cwd=p)
    assert outputs["secretOut"] == "s3cr3t-p", outputs
    cli.run(*UP, "--expect-no-changes", cwd=p)


def restart(daemon: Daemon, **flags: object) -> Daemon:
    daemon.stop()
    for name in ("secrets_key", "previous_secrets_keys", "key_rotation_batch"):
        daemon.flags.pop(name, None)
    daemon.env.pop("PULUMID_TEST_FAULTS", None)
    daemon.flags.update(flags)
    return daemon.start()


def refused(daemon: Daemon, **flags: object) -> str:
    """Start with FLAGS expecting a refusal: the daemon's output."""
    daemon.stop()
    for name in ("secrets_key", "previous_secrets_keys"):
        daemon.flags.pop(name, None)
    daemon.flags.update(flags)
    command = daemon.command()
    result = subprocess.run(
        command, env=daemon.environment(), cwd=daemon.workdir, capture_output=True, timeout=60
    )
    assert result.returncode != 0, "the daemon started without a key its data needs"
    return (result.stdout + result.stderr).decode(errors="replace")


def test_rotation_survives_a_kill_and_moves_to_kms_and_back(
    daemon: Daemon,
    cli_versions: list[str],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    kms: LocalKMS,
    tmp_path: Path,
) -> None:
    # Rotation is the server's alone: the newest CLI is enough.
    cli = make_cli(cli_versions[0], daemon)
    p = make_project(cli, daemon, "p", items=2)
    for i in range(STACKS):
        cli.run("stack", "init", f"acme/s{i}", cwd=p)
        cli.run("config", "set", "--secret", "pw", f"hunter{i}", cwd=p)
    cli.run("stack", "select", "acme/s0", cwd=p)
    cli.run(*UP, cwd=p)
    first = MasterKey.from_hex(daemon.master_key)
    assert key_counts(daemon) == {local_key_id(first): STACKS}

    # A new master key, the old one kept as a previous key; killed after two batches of 3.
    old_file = tmp_path / "old.key"
    old_file.write_text(daemon.master_key + "\n")
    daemon.stop()
    daemon.master_key = secrets.token_hex(32)
    second = MasterKey.from_hex(daemon.master_key)
    daemon.flags.update(previous_secrets_keys=f"file:{old_file}", key_rotation_batch=3)
    daemon.env["PULUMID_TEST_FAULTS"] = "kill@rewrapped:2"
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == -9, daemon.log_text()
    daemon.kill()
    assert key_counts(daemon) == {local_key_id(first): STACKS - 6, local_key_id(second): 6}

    # Restarted: every stack reads (old or new key) while the rotation finishes.
    restart(daemon, previous_secrets_keys=f"file:{old_file}", key_rotation_batch=3)
    all_secrets_decrypt(cli, p)
    wait_until(
        lambda: key_counts(daemon) == {local_key_id(second): STACKS} or None,
        90,
        "the rotation to finish",
    )
    assert rotate(daemon) == {local_key_id(second): STACKS}
    # The old key is retired: not needed any more...
    restart(daemon)
    all_secrets_decrypt(cli, p)
    # ... and not enough any more.
    second_hex = daemon.master_key
    daemon.master_key = first.hex()
    message = refused(daemon)
    assert local_key_id(second) in message and "not configured" in message, message
    daemon.master_key = second_hex

    # local -> AWS KMS: the master key still opens what it wrapped until the move is done.
    arn = kms.create_key()
    spec = f"awskms://{arn}?region={kms.region}&endpoint={kms.endpoint}"
    daemon.env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    restart(daemon, secrets_key=spec, previous_secrets_keys="local")
    assert rotate(daemon) == {f"awskms:{arn}": STACKS}
    assert key_counts(daemon) == {f"awskms:{arn}": STACKS}
    all_secrets_decrypt(cli, p)
    restart(daemon, secrets_key=spec)  # KMS only: the master key is not used
    all_secrets_decrypt(cli, p)
    message = refused(daemon)  # the master key alone cannot open KMS-wrapped keys
    assert f"awskms:{arn}" in message, message

    # ... and back to the local key.
    restart(daemon, secrets_key="local", previous_secrets_keys=spec)
    assert rotate(daemon) == {local_key_id(second): STACKS}
    kms.stop()  # KMS gone: nothing needs it any more
    restart(daemon)
    all_secrets_decrypt(cli, p)
    assert "kill@rewrapped" not in daemon.log_text(tail=10**7).split("==== starting")[-1]
