"""The management listener of a real `twistd pulumid` while the real CLI runs an update."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI
from tests.ops.test_management import sample

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_metrics_follow_an_update(
    daemon: Daemon,
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_versions: list[str],
    make_project: Callable[..., Path],
) -> None:
    cli = make_cli(cli_versions[0], daemon)
    work = make_project(cli, daemon, "ops", items=3)
    cli.run("stack", "init", "acme/dev", cwd=work)
    cli.run("up", "--yes", "--skip-preview", cwd=work)

    assert fetch(daemon.management_url + "/healthz")[0] == 200
    assert fetch(daemon.management_url + "/readyz")[0] == 200
    status, metrics = fetch(daemon.management_url + "/metrics")
    assert status == 200
    # 3.259.0 journals: its batches are counted, in requests and in bytes.
    assert sample(metrics, "pulumid_update_writes_total", kind="journal") >= 1
    assert sample(metrics, "pulumid_update_body_bytes_total", kind="journal") > 100
    assert sample(metrics, "pulumid_update_writes_total", kind="events") >= 1
    route = "/api/stacks/{org}/{project}/{stack}/{kind}/{update_id}/complete"
    assert sample(metrics, "pulumid_http_requests_total", route=route, status="204") == 1
    # The API port does not serve them.
    api = urllib.request.Request(daemon.url + "/metrics")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api, timeout=10)
    assert refused.value.code == 404
