"""Crashes mid-update: the daemon SIGKILLed, the CLI SIGKILLed, a failing step, an expired lease.

Whatever dies, every step the daemon acknowledged stays in the state, and the next `up`
converges without re-creating what was acknowledged (the test provider's ids are fixed by
name, so `created` timestamps tell a re-created resource from a kept one).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Background, Daemon, PulumiCLI, stack_path, wait_until
from tests.e2e.programs import ITEM_TYPE, write_yaml_program

pytestmark = pytest.mark.e2e

UP = ("up", "--yes", "--skip-preview")


def server_state(daemon: Daemon, stack: str) -> dict[str, Any]:
    """The stack's state as the daemon has it now (mid-update: what it acknowledged so far)."""
    document: dict[str, Any] = daemon.api_ok("GET", stack_path(daemon.org, "p", stack) + "/export")
    return document


def created(document: dict[str, Any]) -> dict[str, str]:
    """Item name -> its `created` timestamp, for the items of an exported state."""
    deployment = document.get("deployment") or {}
    return {
        str(r["urn"]).rsplit("::", 1)[1]: str(r.get("created"))
        for r in deployment.get("resources") or []
        if r.get("type") == ITEM_TYPE
    }


def wait_for_items(
    daemon: Daemon, stack: str, run: Background, names: Collection[str]
) -> dict[str, str]:
    """Poll the daemon's export until it holds every item of `names`; return its items."""

    def acknowledged() -> dict[str, str] | None:
        if run.proc.poll() is not None:
            pytest.fail(f"the update exited {run.proc.returncode} too early:\n{run.output()}")
        items = created(server_state(daemon, stack))
        return items if set(names) <= set(items) else None

    return wait_until(acknowledged, 90, f"items {sorted(names)} in the state", 0.2, run.output)


def locked(daemon: Daemon, stack: str) -> bool:
    body = daemon.api_ok("GET", stack_path(daemon.org, "p", stack))
    return bool(body.get("currentOperation"))


def settle(run: Background, timeout: float) -> int | None:
    """Wait for a background CLI; SIGKILL it if it is still running after `timeout`."""
    try:
        return run.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        return None


def assert_kept(before: dict[str, str], after: dict[str, str]) -> None:
    """Every acknowledged item is still there, with its original `created` (not re-created)."""
    missing = sorted(set(before) - set(after))
    assert not missing, f"acknowledged items lost: {missing}"
    recreated = sorted(n for n in before if after[n] != before[n])
    assert not recreated, f"acknowledged items re-created: {recreated} ({before} -> {after})"


def converge(cli: PulumiCLI, p: Path, count: int) -> str:
    """`up` succeeds, a second one has nothing to do, and all `count` items exist."""
    output = cli.run(*UP, cwd=p).stdout
    cli.run(*UP, "--expect-no-changes", cwd=p)
    names = set(created(json_export(cli, p)))
    assert names == {f"item{i}" for i in range(count)}, names
    return output


def journaled(daemon: Daemon, stack: str) -> bool:
    """Whether the daemon's log shows journal entries sent for an update of `stack`."""
    prefix = stack_path(daemon.org, "p", stack) + "/update/"
    return any(
        prefix in line and "/journalentries " in line
        for line in daemon.log_text(tail=10**8).splitlines()
    )


def json_export(cli: PulumiCLI, p: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(cli.run("stack", "export", cwd=p).stdout)
    return document


def test_daemon_killed_mid_update(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=6, delay_ms=1500)
    cli.run("stack", "init", "acme/crash", cwd=p)
    run = cli.popen(*UP, cwd=p)
    try:
        before = wait_for_items(daemon, "crash", run, ["item0", "item1"])
        daemon.kill()
        daemon.start()
        # The CLI retries through the restart: it may finish the update, or give up.
        rc = settle(run, 60)
    finally:
        run.kill()
    assert_kept(before, created(server_state(daemon, "crash")))
    if rc != 0 and locked(daemon, "crash"):
        cli.run("cancel", "--yes", cwd=p)
    assert not locked(daemon, "crash")
    assert_kept(before, created(json_export(cli, p)))
    converge(cli, p, 6)
    assert_kept(before, created(json_export(cli, p)))


def test_cli_killed_mid_update(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=4, delay_ms=1000)
    cli.run("stack", "init", "acme/killed", cwd=p)
    run = cli.popen(*UP, cwd=p)
    try:
        before = wait_for_items(daemon, "killed", run, ["item0", "item1"])
    finally:
        run.kill()
    assert locked(daemon, "killed")
    cli.run("cancel", "--yes", cwd=p)
    assert not locked(daemon, "killed")
    kept = created(json_export(cli, p))
    assert_kept(before, kept)
    output = converge(cli, p, 4)
    assert f"{4 - len(kept)} created" in output, output
    assert_kept(kept, created(json_export(cli, p)))


def test_journaled_failure_part_way_resumes(
    daemon: Daemon,
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
) -> None:
    cli = make_cli("3.259.0", daemon)
    p = make_project(cli, daemon, "p", items=6, fail_names={"item3"})
    cli.run("stack", "init", "acme/partial", cwd=p)
    output = cli.fail(*UP, cwd=p)
    assert "create failed as asked" in output, output
    assert journaled(daemon, "partial")

    before = created(json_export(cli, p))
    assert set(before) == {"item0", "item1", "item2"}, before
    history = cli.json("stack", "history", cwd=p)
    assert history[0]["result"] == "failed", history[0]

    write_yaml_program(p, project="p", provider_dir=provider_dir, count=6)
    output = converge(cli, p, 6)
    assert "3 created" in output, output
    assert_kept(before, created(json_export(cli, p)))


def test_expired_journaling_update_is_replayed(
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
) -> None:
    daemon = start_daemon(lease_ttl=3)
    cli = make_cli("3.259.0", daemon)
    # The CLI renews its lease every 150 s, so this update's lease ends 3 s after it started
    # whatever happens: item1 must be acknowledged well before that.
    p = make_project(cli, daemon, "p", items=6, delay_ms=400)
    cli.run("stack", "init", "acme/lease", cwd=p)
    run = cli.popen(*UP, cwd=p)
    try:
        before = wait_for_items(daemon, "lease", run, ["item0", "item1"])
    finally:
        run.kill()
    assert journaled(daemon, "lease")
    time.sleep(4)  # the 3 s lease is gone; no `pulumi cancel`
    write_yaml_program(p, project="p", provider_dir=provider_dir, count=6)
    converge(cli, p, 6)
    assert_kept(before, created(json_export(cli, p)))
    history = cli.json("stack", "history", cwd=p)
    assert [h["result"] for h in history] == ["succeeded", "succeeded", "failed"], history
    assert "lease of update" in daemon.log_text(tail=10**7)
