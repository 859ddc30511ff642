"""stack export / import round trips and `pulumi state` edits with the real CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, resources, urn_named, urns

pytestmark = pytest.mark.e2e


def export(cli: PulumiCLI, p: Path, *flags: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(cli.run("stack", "export", *flags, cwd=p).stdout)
    return document


def test_export_import_and_state_edits(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path], tmp_path: Path
) -> None:
    p = project("p", items=3)
    cli.run("stack", "init", "acme/st", cwd=p)
    cli.run("up", "--yes", "--skip-preview", cwd=p)

    saved = tmp_path / "a.json"
    cli.run("stack", "export", "--file", str(saved), cwd=p)
    original = json.loads(saved.read_text())
    assert len(resources(original)) == 5
    plain = resources(export(cli, p, "--show-secrets"))
    assert resources(export(cli, p, "--version", "1")) == resources(original)

    cli.run("stack", "import", "--file", str(saved), cwd=p)
    # Secret ciphertexts may be re-encrypted on import: compare the decrypted resources.
    assert resources(export(cli, p, "--show-secrets")) == plain

    leaf = urn_named(original, "item2")
    cli.run("state", "delete", leaf, "--yes", cwd=p)
    after_delete = export(cli, p)
    assert leaf not in urns(after_delete)
    assert len(resources(after_delete)) == 4

    # Protect item1 by editing the state, then unprotect it with the CLI.
    target = urn_named(original, "item1")
    for resource in after_delete["deployment"]["resources"]:
        if resource["urn"] == target:
            resource["protect"] = True
    edited = tmp_path / "protected.json"
    edited.write_text(json.dumps(after_delete))
    cli.run("stack", "import", "--file", str(edited), cwd=p)
    protected = {r["urn"]: r.get("protect", False) for r in resources(export(cli, p))}
    assert protected[target] is True
    cli.run("state", "unprotect", target, "--yes", cwd=p)
    protected = {r["urn"]: r.get("protect", False) for r in resources(export(cli, p))}
    assert protected[target] is False

    # A SIGKILLed daemon keeps everything it acknowledged.
    before_kill = export(cli, p)
    daemon.kill()
    daemon.start()
    assert resources(export(cli, p)) == resources(before_kill)

    # Older versions are still there, unchanged.
    assert resources(export(cli, p, "--version", "1")) == resources(original)
    history = cli.json("stack", "history", cwd=p)
    assert history[-1]["kind"] == "update" and history[-1]["version"] == 1
