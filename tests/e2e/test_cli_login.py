"""Login, whoami and logout against pulumid with the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI

pytestmark = pytest.mark.e2e


def test_login_whoami_logout(cli: PulumiCLI, daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    login = cli.run("login", daemon.url, cwd=work)
    assert "alice" in login.stdout + login.stderr

    assert cli.run("whoami", cwd=work).stdout.strip() == "alice"
    verbose = cli.run("whoami", "-v", cwd=work).stdout
    assert "User: alice" in verbose
    organizations = [line for line in verbose.splitlines() if line.startswith("Organizations:")]
    assert organizations, verbose
    assert "acme" in organizations[0].split(":", 1)[1].replace(",", " ").split()

    cli.run("logout", cwd=work)
    # Without the environment token nothing is left to authenticate with.
    cli.fail(
        "whoami",
        cwd=work,
        env_extra={"PULUMI_ACCESS_TOKEN": None, "PULUMI_BACKEND_URL": daemon.url},
    )


def test_login_with_wrong_token_fails(cli: PulumiCLI, daemon: Daemon, tmp_path: Path) -> None:
    output = cli.fail(
        "login", daemon.url, cwd=tmp_path, env_extra={"PULUMI_ACCESS_TOKEN": "pul-wrong"}
    )
    assert "alice" not in output
    # The right token still works afterwards.
    cli.run("login", daemon.url, cwd=tmp_path)
