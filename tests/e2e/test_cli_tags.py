"""Stack tags with the real CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI

pytestmark = pytest.mark.e2e


def test_stack_tags(cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]) -> None:
    p = project("p", items=1)
    cli.run("stack", "init", "acme/t", cwd=p)
    cli.run("stack", "tag", "set", "owner", "bob", cwd=p)
    assert cli.run("stack", "tag", "get", "owner", cwd=p).stdout.strip() == "bob"
    tags = cli.json("stack", "tag", "ls", cwd=p)
    assert tags["owner"] == "bob"
    assert tags["pulumi:project"] == "p"  # sent by `stack init`
    assert "owner" in cli.run("stack", "tag", "ls", cwd=p).stdout

    cli.run("stack", "tag", "rm", "owner", cwd=p)
    assert "owner" not in cli.json("stack", "tag", "ls", cwd=p)
    cli.fail("stack", "tag", "get", "owner", cwd=p)
    assert "owner" not in daemon.api_ok("GET", "/api/stacks/acme/p/t")["tags"]
