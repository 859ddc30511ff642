"""Stack init, list (filters and paging), select and rm with the real CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, stack_names

pytestmark = pytest.mark.e2e


def test_stack_ls_filters(cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]) -> None:
    p = project("p", items=1)
    q = project("q", items=1)
    for name in ("s1", "s2"):
        cli.run("stack", "init", f"acme/{name}", cwd=p)
    cli.run("stack", "init", "acme/s3", cwd=q)
    cli.run("stack", "tag", "set", "team", "blue", "--stack", "acme/s1", cwd=p)
    cli.run("stack", "tag", "set", "team", "red", "--stack", "acme/s3", cwd=q)

    def ls(*flags: str) -> set[str]:
        return stack_names(cli.json("stack", "ls", *flags, cwd=p))

    assert ls() == {"s1", "s2"}  # the current project only
    assert ls("--all") == {"s1", "s2", "s3"}
    assert ls("--all", "--organization", "acme") == {"s1", "s2", "s3"}
    assert ls("--organization", "acme") == {"s1", "s2"}
    assert ls("--project", "q") == {"s3"}
    assert ls("--all", "--tag", "team=blue") == {"s1"}
    assert ls("--all", "--tag", "team") == {"s1", "s3"}
    assert ls("--all", "--tag", "team=green") == set()


def test_stack_ls_pages(
    start_daemon: Callable[..., Daemon],
    cli_version: str,
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
) -> None:
    # Pages of 50 (the default is 1,000): 120 stacks take three pages.
    daemon = start_daemon(page_size=50)
    cli = make_cli(cli_version, daemon)
    p = make_project(cli, daemon, "p", items=1)
    expected = {f"b{i:03d}" for i in range(120)}
    for name in sorted(expected):
        daemon.api_ok("POST", "/api/stacks/acme/bulk", {"stackName": name})
    first_page = daemon.api_ok("GET", "/api/user/stacks?project=bulk")
    assert first_page["continuationToken"], "120 stacks should not fit on one page"
    assert len(first_page["stacks"]) < len(expected)
    listing = cli.json("stack", "ls", "--all", cwd=p)
    assert stack_names(listing) == expected
    assert len(listing) == len(expected)  # no page listed twice
    assert stack_names(cli.json("stack", "ls", "--project", "bulk", cwd=p)) == expected


def test_stack_select_and_rm(cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]) -> None:
    p = project("p", items=2)
    cli.run("stack", "init", "acme/full", cwd=p)
    cli.run("up", "--yes", "--skip-preview", cwd=p)
    cli.run("stack", "init", "acme/empty", cwd=p)
    assert cli.run("stack", "--show-name", cwd=p).stdout.strip() == "empty"
    cli.run("stack", "select", "acme/full", cwd=p)
    assert cli.run("stack", "--show-name", cwd=p).stdout.strip() == "full"

    refused = cli.fail("stack", "rm", "--yes", cwd=p)
    assert "resources" in refused and "--force" in refused, refused
    assert daemon.api("GET", "/api/stacks/acme/p/full").status == 200

    cli.run("stack", "rm", "--force", "--yes", cwd=p)
    assert daemon.api("GET", "/api/stacks/acme/p/full").status == 404
    cli.run("stack", "rm", "--yes", "--stack", "acme/empty", cwd=p)
    assert daemon.api("GET", "/api/stacks/acme/p/empty").status == 404
    assert stack_names(cli.json("stack", "ls", cwd=p)) == set()
