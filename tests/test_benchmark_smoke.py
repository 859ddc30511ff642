"""Smoke tests of the benchmarks (benchmarks/): they run end to end at a tiny size.

The harness runs the real CLI against every built-in backend (the pulumid variants, including
pulumid on PostgreSQL, on PostgreSQL with MinIO blobs, and three such nodes behind HAProxy,
file, s3 on a local MinIO, and the floor); a missing artifact (CLI, YAML host, MinIO, an
installed PostgreSQL or HAProxy) makes it exit non-zero, which fails here: nothing is skipped.
No time is asserted.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import CSV_FIELDS, write_docs
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
            "--keep",
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
    # The server's peak RSS and CPU per operation: measured for our servers (one node or
    # three), empty for the CLI's own backends.
    assert list(rows[0]) == [*CSV_FIELDS]
    for row in rows:
        if row["backend"].startswith("pulumid"):
            assert float(row["peak_rss_mib"]) > 0, row
            assert float(row["cpu_seconds"]) >= 0, row
        else:
            assert row["peak_rss_mib"] == row["cpu_seconds"] == "", row
    three = [float(r["peak_rss_mib"]) for r in rows if r["backend"] == "pulumid-3nodes"]
    one = [float(r["peak_rss_mib"]) for r in rows if r["backend"] == "pulumid-pg-s3"]
    assert min(three) > max(one), "the three nodes are summed"

    table = (out / "results.md").read_text()
    assert (
        "| Operation | Backend | Median (s) | vs pulumid | vs floor | Peak RSS (MiB) | CPU (s) |"
        in table
    )
    for backend in BUILTIN_BACKENDS:
        assert f"| create | {backend} |" in table
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A progress line per operation.
    assert proc.stdout.count("N=2 ") >= len(expected)

    # The PostgreSQL backends kept nothing in SQLite, pulumid-pg-s3 and pulumid-3nodes put
    # their blobs in MinIO (pulumid-pg inline), the three nodes all served the CLI, and the
    # run says which PostgreSQL it used, durable like the SQLite it is compared with.
    work = out / "work"
    assert (work / "pulumid-2-1" / "pulumid.sqlite").is_file()
    for backend in ("pulumid-pg", "pulumid-pg-s3", "pulumid-3nodes"):
        assert not list((work / f"{backend}-2-1").glob("pulumid.sqlite*"))
    prefixes = list((work / "minio" / "data" / "pulumid-blobs").iterdir())
    assert sorted(p.name.rsplit("-", 1)[0] for p in prefixes) == [
        "pulumid-3nodes",
        "pulumid-pg-s3",
    ]
    assert all(list(prefix.iterdir()) for prefix in prefixes)
    proxied = (out / "logs" / "pulumid-3nodes-2-1" / "haproxy.log").read_text()
    for node in ("node0", "node1", "node2"):
        assert f"node={node} status=200" in proxied
    meta = json.loads((out / "meta.json").read_text())
    assert meta["versions"]["postgresql"]
    assert "fsync = on" in meta["postgresql_settings"]
    assert "synchronous_commit = on" in meta["postgresql_settings"]
    assert meta["versions"]["haproxy"]
    assert "PostgreSQL" in table
    assert (out / "logs" / "postgres" / "postgres.log").is_file()

    # The docs section is generated from a run's output (into a copy of the page here).
    page, chart = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    page.write_text((REPO / "docs" / "benchmarks.md").read_text())
    write_docs(out, page=page, chart=chart)
    text = page.read_text()
    assert "| create | pulumid |" in text
    assert "Peak RSS (MiB)" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_stacks_benchmark_lists_every_stack(tmp_path: Path) -> None:
    out = tmp_path / "stacks"
    # More stacks than one page of GET /api/user/stacks (100), so the CLI pages.
    proc = _run(
        ["benchmarks.stacks", "--stacks", "250", "--repeats", "2", "--out", str(out)],
        timeout=600,
    )
    with (out / "measurements.csv").open(newline="") as source:
        rows = list(csv.DictReader(source))
    assert [(r["backend"], r["stacks"], r["repeat"]) for r in rows] == [
        ("pulumid", "250", "1"),
        ("pulumid", "250", "2"),
    ]
    for row in rows:
        assert float(row["seconds"]) > 0
        assert float(row["peak_rss_mib"]) > 0
        assert float(row["cpu_seconds"]) >= 0
    # Each run's output was checked: every stack created listed once.
    assert proc.stdout.count("check: 250 stacks listed, each once") == 2, proc.stdout
    assert "| pulumid | 250 | 2 |" in (out / "results.md").read_text()


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
            "--inflight",
            "3",
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
        "updates in flight at once",
    ):
        assert title in text


def test_backup_and_rotation_benchmark_runs() -> None:
    proc = _run(
        ["benchmarks.backups", "--stacks", "6", "--resources", "3", "--payload", "64", "--kms"],
        timeout=600,
    )
    lines = proc.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines[1:]] == [
        "backup",
        "restore",
        "rotation to a new master key",
        "rotation local -> AWS KMS (local-kms)",
    ], proc.stdout
    # Every data key moved: 6 under the new key, 0 left under the old (then under KMS).
    for line in lines[3:]:
        assert "for 6 stacks" in line and "': 6" in line and "': 0" in line, line
