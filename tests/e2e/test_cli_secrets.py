"""Service-managed secrets: config, secret outputs, and no plaintext in the exported state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import PulumiCLI

pytestmark = pytest.mark.e2e


def test_secrets(cli: PulumiCLI, project: Callable[..., Path]) -> None:
    p = project("p", items=2)
    cli.run("stack", "init", "acme/sec", cwd=p)
    cli.run("config", "set", "--secret", "pw", "hunter2", cwd=p)
    stack_config = (p / "Pulumi.sec.yaml").read_text()
    assert "secure:" in stack_config and "hunter2" not in stack_config
    assert cli.run("config", "get", "pw", cwd=p).stdout.strip() == "hunter2"

    cli.run("up", "--yes", "--skip-preview", cwd=p)
    assert cli.json("stack", "output", "--show-secrets", cwd=p)["secretOut"] == "s3cr3t-p"
    assert cli.json("stack", "output", cwd=p)["secretOut"] == "[secret]"

    exported = cli.run("stack", "export", cwd=p).stdout
    assert "s3cr3t-p" not in exported and "hunter2" not in exported
    assert "ciphertext" in exported
    assert "s3cr3t-p" in cli.run("stack", "export", "--show-secrets", cwd=p).stdout
