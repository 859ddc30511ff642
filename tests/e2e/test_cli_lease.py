"""An update whose CLI died is released when its lease expires (no `pulumi cancel`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, wait_for_update_running
from tests.e2e.programs import write_yaml_program

pytestmark = pytest.mark.e2e


def test_expired_lease_frees_the_stack(
    cli_versions: list[str],
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
) -> None:
    daemon = start_daemon(lease_ttl=3)
    cli = make_cli(cli_versions[0], daemon)
    p = make_project(cli, daemon, "p", items=3, delay_ms=3000)
    cli.run("stack", "init", "acme/lease", cwd=p)
    run = cli.popen("up", "--yes", "--skip-preview", cwd=p)
    try:
        wait_for_update_running(daemon, "lease", run)
        time.sleep(1)
    finally:
        run.kill()
    time.sleep(5)  # the 3 s lease is gone
    # Without the delays the next update ends well within one lease.
    write_yaml_program(p, project="p", provider_dir=provider_dir, count=3)
    cli.run("up", "--yes", "--skip-preview", cwd=p)
    cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p)
