"""A resource that fails to create: the update fails, earlier resources stay in the state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import PulumiCLI, urns

pytestmark = pytest.mark.e2e


def test_partial_failure_keeps_created_resources(
    cli: PulumiCLI, project: Callable[..., Path]
) -> None:
    p = project("p", items=5, fail_names=["item3"])
    cli.run("stack", "init", "acme/partial", cwd=p)
    output = cli.fail("up", "--yes", "--skip-preview", cwd=p)
    assert "create failed as asked" in output, output

    names = {
        urn.rsplit("::", 1)[1] for urn in urns(json.loads(cli.run("stack", "export", cwd=p).stdout))
    }
    assert {"item0", "item1", "item2"} <= names
    assert not names & {"item3", "item4"}
    history = cli.json("stack", "history", cwd=p)
    assert history[0]["result"] == "failed"
