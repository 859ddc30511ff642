"""The daemon's JSON log over a whole real-CLI session: every line typed, access and audit
lines where they were sent, and no token, master key or secret anywhere in them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]

PLAINTEXT = "correct-horse-battery-staple-7781"


def test_json_logs_carry_no_secrets(
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_versions: list[str],
    make_project: Callable[..., Path],
    tmp_path: Path,
) -> None:
    access, audit = tmp_path / "access.jsonl", tmp_path / "audit.jsonl"
    daemon = start_daemon(log_format="json", access_log=access, audit_log=audit)
    cli = make_cli(cli_versions[0], daemon)
    work = make_project(cli, daemon, "logs", items=3)
    cli.run("stack", "init", "acme/dev", cwd=work)
    cli.run("config", "set", "--secret", "dbPassword", PLAINTEXT, cwd=work)
    cli.run("up", "--yes", "--skip-preview", cwd=work)
    shown = cli.run("stack", "export", "--show-secrets", cwd=work).stdout
    assert "s3cr3t-logs" in shown  # the program's secret, decrypted for the CLI
    assert PLAINTEXT == cli.run("config", "get", "dbPassword", cwd=work).stdout.strip()
    cli.run("destroy", "--yes", "--skip-preview", cwd=work)
    cli.run("stack", "rm", "--yes", cwd=work)
    daemon.stop()

    main = [
        line for line in daemon.log_path.read_text().splitlines() if not line.startswith("====")
    ]
    parsed = [json.loads(line) for line in main]  # every line is one JSON object
    kinds = {line["log_type"] for line in parsed}
    assert kinds == {"operational", "access", "audit"}, kinds
    access_lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert access_lines and all(line["log_type"] == "access" for line in access_lines)
    routes = {line["route"] for line in access_lines}
    assert "/api/stacks/{org}/{project}/{stack}/batch-decrypt" in routes, routes
    first = access_lines[0]
    assert {"method", "route", "path", "status", "latency_ms", "bytes", "user"} <= set(first)
    audit_lines = [json.loads(line) for line in audit.read_text().splitlines()]
    actions = {line["action"] for line in audit_lines}
    assert {"stack.create", "update.start", "stack.delete"} <= actions, actions

    everything = "\n".join([*main, access.read_text(), audit.read_text()])
    for secret, what in (
        (daemon.token, "the access token"),
        (daemon.master_key, "the master key"),
        (PLAINTEXT, "a secret's plaintext"),
        ("s3cr3t-logs", "the program's secret"),
    ):
        assert secret not in everything, f"{what} is in the log"
