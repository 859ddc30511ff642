"""Engine events stored by pulumid and read back over the API (and the CLI where it can)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI

pytestmark = pytest.mark.e2e


def test_engine_events_read_back(
    cli: PulumiCLI, daemon: Daemon, project: Callable[..., Path]
) -> None:
    p = project("p", items=2)
    cli.run("stack", "init", "acme/ev", cwd=p)
    cli.run("up", "--yes", "--skip-preview", cwd=p)

    update_id = daemon.api_ok("GET", "/api/stacks/acme/p/ev")["activeUpdate"]
    assert update_id
    body = daemon.api_ok("GET", f"/api/stacks/acme/p/ev/update/{update_id}/events")
    assert body["continuationToken"] is None, body["continuationToken"]
    events = body["events"]
    assert [e["sequence"] for e in events] == list(range(len(events)))
    assert any("preludeEvent" in e for e in events)
    summaries = [e["summaryEvent"] for e in events if "summaryEvent" in e]
    assert len(summaries) == 1
    assert summaries[0]["resourceChanges"] == {"create": 3}
    assert summaries[0]["isPreview"] is False

    if cli.has_command("stack", "history", "events", cwd=p):
        shown = cli.run(
            "stack", "history", "events", update_id, "--all", "--output", "json", cwd=p
        ).stdout
        assert "summaryEvent" in shown, shown
        lines = [line for line in shown.splitlines() if line.strip()]
        try:
            parsed = json.loads(shown)
        except ValueError:
            parsed = [json.loads(line) for line in lines]
        assert len(parsed) == len(events)
