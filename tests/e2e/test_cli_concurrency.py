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
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=3, delay_ms=3000)
    cli.run("stack", "init", "acme/crashed", cwd=p)
    run = cli.popen("up", "--yes", "--skip-preview", cwd=p)
    try:
        wait_for_update_running(daemon, "crashed", run)
        # Kill it once item0 is created and item1 is being created.
        wait_until(lambda: "item0 created" in run.output(), 60, "item0 created", 0.1, run.output)
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
