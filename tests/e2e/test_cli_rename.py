"""stack rename within a project and to another project, with the real CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, urns

pytestmark = pytest.mark.e2e


def deploy_with_secret(cli: PulumiCLI, p: Path, stack: str) -> None:
    cli.run("stack", "init", stack, cwd=p)
    cli.run("config", "set", "--secret", "pw", "hunter2", cwd=p)
    cli.run("up", "--yes", "--skip-preview", cwd=p)


def test_rename_within_project(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=2)
    deploy_with_secret(cli, p, "acme/old")

    cli.run("stack", "rename", "new", cwd=p)
    assert (p / "Pulumi.new.yaml").is_file() and not (p / "Pulumi.old.yaml").exists()
    assert cli.run("stack", "--show-name", cwd=p).stdout.strip() == "new"
    assert daemon.api("GET", "/api/stacks/acme/p/old").status == 404
    state = json.loads(cli.run("stack", "export", cwd=p).stdout)
    assert all(urn.startswith("urn:pulumi:new::p::") for urn in urns(state)), urns(state)
    assert "urn:pulumi:new::p::pulumi:pulumi:Stack::p-new" in urns(state)

    assert cli.run("config", "get", "pw", cwd=p).stdout.strip() == "hunter2"
    assert cli.json("stack", "output", "--show-secrets", cwd=p)["secretOut"] == "s3cr3t-p"
    cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p)
    history = cli.json("stack", "history", cwd=p)
    assert [h["version"] for h in history][-1] == 1
    assert history[-1]["resourceChanges"] == {"create": 3}


def test_rename_to_another_project(
    cli: PulumiCLI,
    daemon: Daemon,
    project: Callable[..., Path],
) -> None:
    p = project("p", items=2)
    deploy_with_secret(cli, p, "acme/s")

    cli.run("stack", "rename", "acme/other/s2", cwd=p)
    assert daemon.api("GET", "/api/stacks/acme/p/s").status == 404
    assert daemon.api_ok("GET", "/api/stacks/acme/other/s2")["projectName"] == "other"

    # The program's project name must match to work with the stack again.
    other = project("other", items=2)
    shutil.copy(p / "Pulumi.s2.yaml", other / "Pulumi.s2.yaml")
    cli.run("stack", "select", "acme/other/s2", cwd=other)
    state = json.loads(cli.run("stack", "export", cwd=other).stdout)
    assert all(urn.startswith("urn:pulumi:s2::other::") for urn in urns(state)), urns(state)
    assert cli.run("config", "get", "p:pw", cwd=other).stdout.strip() == "hunter2"
    outputs = cli.json("stack", "output", "--show-secrets", cwd=other)
    assert outputs["secretOut"] == "s3cr3t-p"  # written by the program of project p
    history = cli.json("stack", "history", cwd=other)
    assert [h["kind"] for h in history][-1] == "update"

    # The renamed URNs match the program of project "other": only item0, whose secret input
    # differs by project name, is updated; nothing is created, deleted or replaced.
    up = cli.run("up", "--yes", "--skip-preview", cwd=other).stdout
    summary = up[up.index("Resources:") :]
    assert "1 updated" in summary and "2 unchanged" in summary, summary
    assert "created" not in summary and "deleted" not in summary, summary
    assert cli.json("stack", "output", "--show-secrets", cwd=other)["secretOut"] == "s3cr3t-other"
