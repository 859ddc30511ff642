"""A backup taken while the real CLI runs a 200-resource update (eight steps at a time, so
checkpoints arrive concurrently), restored with `pulumid-admin backups restore` into a new
database, served by a new daemon: the CLI sees the stacks as they were at the backup, and
`pulumi cancel` / `refresh` / `up` bring them back in line with the program."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, stack_path, wait_until
from tests.e2e.programs import ITEM_TYPE, write_yaml_program

pytestmark = pytest.mark.e2e

UP = ("up", "--yes", "--skip-preview")
ADMIN = (sys.executable, "-m", "pulumid.admin")


def items(daemon: Daemon, project: str, stack: str) -> set[str]:
    document: dict[str, Any] = daemon.api_ok(
        "GET", stack_path(daemon.org, project, stack) + "/export"
    )
    resources = (document.get("deployment") or {}).get("resources") or []
    return {str(r["urn"]).rsplit("::", 1)[1] for r in resources if r.get("type") == ITEM_TYPE}


def test_backup_during_an_update_restores_and_converges(
    start_daemon: Callable[..., Daemon],
    cli_versions: list[str],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
    tmp_path: Path,
) -> None:
    backups = tmp_path / "backups"
    daemon = start_daemon(backup_to=f"{backups}?keep=3")
    cli = make_cli(cli_versions[0], daemon)

    # Finished before the backup; changed after it.
    done = make_project(cli, daemon, "done", items=20)
    cli.run("stack", "init", "acme/done", cwd=done)
    cli.run("config", "set", "--secret", "pw", "hunter2", cwd=done)
    cli.run(*UP, cwd=done)
    done_at_backup = items(daemon, "done", "done")
    assert len(done_at_backup) == 20

    # Running while the backup is taken: 10 chained items and 190 independent ones.
    big = make_project(cli, daemon, "big", items=10, extra_resources=190, delay_ms=150)
    cli.run("stack", "init", "acme/big", cwd=big)
    run = cli.popen(*UP, cwd=big)
    try:
        wait_until(
            lambda: len(items(daemon, "big", "big")) >= 60 or None, 120, "60 items acknowledged"
        )
        taken = daemon.api_ok("POST", "/api/admin/backups")
        at_backup = len(items(daemon, "big", "big"))
        assert run.wait(300) == 0, run.output()
    finally:
        run.kill()
    manifest = taken["backup"]
    assert taken["stored"] == [str(backups)] and taken["failed"] == {}
    assert manifest["stacks"] == 2 and manifest["updates"] >= 2
    listed = daemon.api_ok("GET", "/api/admin/backups")["backups"]
    assert [b["name"] for b in listed] == [manifest["name"]]
    assert len(items(daemon, "big", "big")) == 200

    write_yaml_program(done, project="done", provider_dir=provider_dir, count=25)
    cli.run(*UP, cwd=done)

    # Restore into a new database and serve it with the same master key.
    key_file = tmp_path / "master.key"
    key_file.write_text(daemon.master_key + "\n")
    # In the old one's place (same URL: the stacks' service secrets providers name it).
    daemon.stop()
    restored = Daemon(workdir=tmp_path / "restored", token=daemon.token, port=daemon.port)
    restored.master_key = daemon.master_key
    location = str(backups / f"{manifest['name']}.json")
    verify = subprocess.run(
        [*ADMIN, "backups", "verify", location, "--master-key-file", str(key_file)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    result = subprocess.run(
        [*ADMIN, "backups", "restore", location, "--to", str(restored.db_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "stacks: 2" in result.stdout, result.stdout
    again = subprocess.run(
        [*ADMIN, "backups", "restore", location, "--to", str(restored.db_path)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "exists" in again.stderr, again.stderr
    restored.start()
    try:
        cli2 = make_cli(cli_versions[0], restored)
        for directory in (done, big):
            cli2.run("login", restored.url, cwd=directory)
        names = {s["name"].rsplit("/", 1)[-1] for s in cli2.json("stack", "ls", "--all", cwd=done)}
        assert names == {"done", "big"}, names

        # As of the backup: done had 20 items; big was part way, its update still running.
        cli2.run("stack", "select", "acme/done", cwd=done)
        assert items(restored, "done", "done") == done_at_backup
        assert cli2.run("config", "get", "pw", cwd=done).stdout.strip() == "hunter2"
        kept = items(restored, "big", "big")
        assert 60 <= len(kept) <= at_backup, (len(kept), at_backup)
        cli2.run("stack", "select", "acme/big", cwd=big)
        cli2.run("cancel", "--yes", cwd=big)

        # Converge: refresh against what exists, then up to the program.
        for directory in (done, big):
            cli2.run("refresh", "--yes", cwd=directory)
            cli2.run(*UP, cwd=directory)
            cli2.run(*UP, "--expect-no-changes", cwd=directory)
        assert len(items(restored, "done", "done")) == 25
        assert len(items(restored, "big", "big")) == 200
    finally:
        restored.stop()
