"""A modest stack with large resources: 30 items of 16 KB each up, no-op, destroy."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import PulumiCLI, resources

pytestmark = pytest.mark.e2e


# Heavy: the two ends of the storage matrix are enough.
@pytest.mark.storages("sqlite", "postgres+s3")
def test_thirty_resources_of_16kb(cli: PulumiCLI, project: Callable[..., Path]) -> None:
    p = project("p", items=30, payload_size=16384)
    cli.run("stack", "init", "acme/big", cwd=p)
    assert "31 created" in cli.run("up", "--yes", "--skip-preview", cwd=p).stdout
    state = json.loads(cli.run("stack", "export", cwd=p).stdout)
    payloads = [
        r["outputs"]["payload"] for r in resources(state) if "payload" in r.get("outputs", {})
    ]
    assert len(payloads) == 30 and {len(x) for x in payloads} == {16384}
    noop = cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=p).stdout
    assert "31 unchanged" in noop, noop
    cli.run("destroy", "--yes", "--skip-preview", cwd=p)
    assert resources(json.loads(cli.run("stack", "export", cwd=p).stdout)) == []
