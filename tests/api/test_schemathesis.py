"""schemathesis (PyPI) against a live `twistd pulumid` and its own GET /api/openapi: generated
requests to every operation; no 5xx, and no answer that contradicts the document."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon

pytestmark = pytest.mark.live

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# What the document promises today: statuses, content types, response schemas, never a 5xx.
# (Request bodies are still described as any JSON object, so "a schema-valid request was
# rejected" checks would only measure that gap.)
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    if not SCHEMATHESIS.is_file():
        pytest.fail(f"{SCHEMATHESIS} is missing: pip install -e '.[test]'", pytrace=False)
    daemon = Daemon(workdir=tmp_path / "daemon")
    daemon.start()
    try:
        status, _ = daemon.api("POST", f"/api/stacks/{daemon.org}/web", {"stackName": "dev"})
        assert status == 200
        result = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{daemon.url}/api/openapi",
                "--header",
                f"Authorization: token {daemon.token}",
                "--checks",
                CHECKS,
                "--phases",
                "coverage,fuzzing",
                "--max-examples",
                "10",
                "--workers",
                "1",
                "--seed",
                "20261201",
                # Hypothesis' own health checks (data generation too slow on a busy machine)
                # judge the test's speed, not the API.
                "--suppress-health-check",
                "all",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    finally:
        daemon.stop()
    report = result.stdout + result.stderr
    tested = re.search(r"Tested: (\d+)", report)
    assert tested is not None and int(tested.group(1)) >= 50, report[-3000:]
    assert result.returncode == 0, report[-6000:]
    assert "Traceback (most recent call last)" not in daemon.log_text(tail=10**7)
