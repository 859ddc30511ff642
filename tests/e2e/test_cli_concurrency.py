"""Two updates on one stack, and `pulumi cancel` after the CLI was killed mid-update."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, wait_for_update_running, wait_until

pytestmark = pytest.mark.e2e

CONFLICT = ("Another update is currently in progress", "[409]")


def test_second_update_conflicts(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=2, delay_ms=4000)
    cli.run("stack", "init", "acme/busy", cwd=p)
    first = cli.popen("up", "--yes", "--skip-preview", cwd=p)
    try:
        wait_for_update_running(daemon, "busy", first)
        refused = cli.fail("up", "--yes", "--skip-preview", cwd=p)
        assert any(marker in refused for marker in CONFLICT), refused
        assert first.wait(120) == 0, first.output()
    finally:
        first.kill()
    assert "3 created" in first.output()
    cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p)


def test_cancel_after_cli_killed(
    cli_version: str,
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
) -> None:
    # The CLI's delta/verbatim checkpoint writer drops pending operations, so a CLI that
    # does not journal (3.210.0) is served full checkpoints here, where they survive.
    daemon = start_daemon(no_delta_checkpoints=True)
    cli = make_cli(cli_version, daemon)
    p = make_project(cli, daemon, "p", items=3, delay_ms=3000)
    cli.run("stack", "init", "acme/crashed", cwd=p)
    run = cli.popen("up", "--yes", "--skip-preview", cwd=p)
    try:
        wait_for_update_running(daemon, "crashed", run)
        # Kill it once the server holds item0 and item1's pending create (acknowledged as a
        # checkpoint or a journal entry: what the CLI printed may still be in flight).
        wait_until(
            lambda: _pending_creates(daemon, "crashed") == ["item1"],
            60,
            "item1's create acknowledged as pending",
            0.1,
            run.output,
        )
    finally:
        run.kill()
    refused = cli.fail("up", "--yes", "--skip-preview", cwd=p)
    assert any(marker in refused for marker in CONFLICT), refused

    cli.run("cancel", "--yes", cwd=p)
    assert not daemon.api_ok("GET", "/api/stacks/acme/p/crashed").get("currentOperation")
    resumed = cli.run("up", "--yes", "--skip-preview", cwd=p).stdout
    # The killed update's progress was kept: item0 exists, item1's create is pending.
    assert "pending operations" in resumed and "item1, interrupted while creating" in resumed
    assert "2 created" in resumed, resumed
    cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p)


def _pending_creates(daemon: Daemon, stack: str) -> list[str]:
    _status, body = daemon.api("GET", f"/api/stacks/acme/p/{stack}/export")
    deployment = body.get("deployment") or {} if isinstance(body, dict) else {}
    return [
        op["resource"]["urn"].rsplit("::", 1)[-1]
        for op in deployment.get("pending_operations") or []
        if op.get("type") == "creating"
    ]
