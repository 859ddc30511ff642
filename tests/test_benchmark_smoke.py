"""Smoke tests of the benchmarks (benchmarks/): they run end to end at a tiny size.

The harness runs the real CLI against all four backends (pulumid, file, s3 on a local MinIO,
and the floor); a missing artifact (CLI, YAML host, MinIO) makes it exit non-zero, which
fails here: nothing is skipped. No time is asserted.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import write_docs
from benchmarks.run import BUILTIN_BACKENDS, OPERATIONS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-8000:]}\nstderr:\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return proc


def test_harness_runs_every_backend_and_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A cold MinIO build (scripts/build-minio.sh) alone takes minutes.
    proc = _run(
        [
            "benchmarks.run",
            "--sizes",
            "2",
            "--repeats",
            "1",
            "--backends",
            ",".join(BUILTIN_BACKENDS),
            "--out",
            str(out),
        ],
        timeout=2400,
    )
    with (out / "measurements.csv").open(newline="") as source:
        rows = list(csv.DictReader(source))
    seen = {(row["backend"], row["operation"]) for row in rows}
    expected = {(b, op) for b in BUILTIN_BACKENDS for op in OPERATIONS}
    assert expected <= seen, f"missing measurements: {sorted(expected - seen)}"
    assert {row["size"] for row in rows} == {"2"}
    assert all(float(row["seconds"]) > 0 for row in rows)

    table = (out / "results.md").read_text()
    assert "| Operation | Backend | Median (s) | vs pulumid | vs floor |" in table
    for backend in BUILTIN_BACKENDS:
        assert f"| create | {backend} |" in table
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A progress line per operation.
    assert proc.stdout.count("N=2 ") >= len(expected)

    # The docs section is generated from a run's output (into a copy of the page here).
    page, chart = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    page.write_text((REPO / "docs" / "benchmarks.md").read_text())
    write_docs(out, page=page, chart=chart)
    text = page.read_text()
    assert "| create | pulumid |" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_micro_benchmarks_run(tmp_path: Path) -> None:
    out = tmp_path / "micro.md"
    _run(
        [
            "benchmarks.micro",
            "--events",
            "200",
            "--sizes",
            "2,10",
            "--repeats",
            "2",
            "--concurrent",
            "3",
            "--loops",
            "2",
            "--stacks",
            "30",
            "--few-stacks",
            "5",
            "--out",
            str(out),
        ],
        timeout=600,
    )
    text = out.read_text()
    for title in (
        "events/batch throughput",
        "checkpoint and export latency",
        "many stacks updating at once",
        "resident memory",
        "journal entries",
        "delta checkpoint",
    ):
        assert title in text
