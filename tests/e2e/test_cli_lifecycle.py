"""preview / up / no-op up / refresh / destroy, export and history with the real CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, resources

pytestmark = pytest.mark.e2e


def test_lifecycle_and_history(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=3)
    cli.run("stack", "init", "acme/dev", cwd=p)

    preview = cli.run("preview", cwd=p).stdout
    assert "4 to create" in preview, preview
    up = cli.run("up", "--yes", cwd=p).stdout  # with its preview phase
    assert "4 created" in up, up

    state = json.loads(cli.run("stack", "export", cwd=p).stdout)
    types = sorted(r["type"] for r in resources(state))
    assert types == [
        "pulumi:providers:pulumidtest",
        "pulumi:pulumi:Stack",
        "pulumidtest:index:Item",
        "pulumidtest:index:Item",
        "pulumidtest:index:Item",
    ]

    noop = cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p).stdout
    assert "4 unchanged" in noop, noop
    daemon.restart()  # SIGTERM, then the same database again
    cli.run("refresh", "--yes", cwd=p)
    cli.run("destroy", "--yes", "--skip-preview", cwd=p)
    assert resources(json.loads(cli.run("stack", "export", cwd=p).stdout)) == []

    # As in Pulumi Cloud's API, previews are listed too (the preview phases of `up` and
    # `refresh` among them), each with the version the stack had when it ran.
    everything = cli.json("stack", "history", cwd=p)
    assert [(h["kind"], h["version"]) for h in everything] == [
        ("destroy", 4),
        ("refresh", 3),
        ("preview", 2),
        ("update", 2),
        ("update", 1),
        ("preview", 0),
        ("preview", 0),
    ], everything
    assert {h["result"] for h in everything} == {"succeeded"}
    history = [h for h in everything if h["kind"] != "preview"]
    assert history[3]["resourceChanges"] == {"create": 4}
    page = cli.json("stack", "history", "--page-size", "1", "--page", "2", cwd=p)
    assert [(h["kind"], h["version"]) for h in page] == [("refresh", 3)]
    text = cli.run("stack", "history", "--page-size", "1", "--page", "9", cwd=p)
    assert "No stack updates found" in text.stdout + text.stderr
