"""Load with a hostile neighbour: one real `twistd pulumid`, and at the same time

- 20 honest clients, each running one complete journaling update on its own stack through
  the HTTP API the way the CLI 3.259.0 does (create stack, create and start the update, gzipped
  journal batches creating 50 resources of ~2 KB, engine event batches, complete), then
  checking the update's status, its events and the stack's export;
- one hostile client hammering the daemon for the whole load with requests that must all be
  refused: missing, wrong and stolen tokens, 5 MB of junk, gzip bombs (200 MB of zeros), JSON
  nested 100,000 deep, NaN and Infinity, numbers no int64 holds, bad paths;
- a prober sending GET /api/user every 20 ms, and a sampler reading the daemon's VmRSS every
  100 ms.

No pulumi CLI is needed. The figures (p99, RSS, what the hostile client sent and got back) are
written to load-figures.json in the test's tmp directory and printed as one line.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon
from tests.load.clients import (
    HonestClient,
    HonestResult,
    Hostile,
    HostileStats,
    MemoryStats,
    Plan,
    ProbeStats,
    Tickets,
    cpu_seconds,
    make_plan,
    probe,
    read_memory,
    sample_memory,
)

pytestmark = pytest.mark.live

PROJECT = "load"
HONEST_CLIENTS = 20
RESOURCES = 50
JOURNAL_BATCHES = 10
PAYLOAD_CHARS = 1000  # per resource: ~1 KB of inputs and ~1 KB of outputs
# Between journal batches, as the CLI waits for its providers: the 20 updates then run side by
# side for most of the load instead of finishing in a burst at its start.
THINK_SECONDS = 1.5
MIN_LOAD_SECONDS = 20.0  # the hostile client and the prober run at least this long
MAX_LOAD_SECONDS = 100.0  # every loop gives up by then
PROBE_INTERVAL = 0.020
RSS_INTERVAL = 0.100
HOSTILE_MAX_REQUESTS = 200_000

P99_LIMIT = 0.100  # seconds, GET /api/user during the load
# Daemon VmRSS, measured on a 2-core machine (2026-12, the daemon of commit 8c7b93d and the
# working tree of the hardening in progress, 4 runs): ~59 MiB after start; max 66-68 MiB under
# the 20 honest updates alone (HOSTILE_MAX_REQUESTS=0); 510-1085 MiB with the hostile client
# too, because today's daemon decompresses a gzip bomb sent with another update's token before
# it checks that token. The bound is twice the honest-load figure: a neighbour must not be able
# to make the daemon hold much more memory than the honest work needs.
RSS_LIMIT = 136 * 1024 * 1024


def _mib(value: float) -> float:
    return round(value / (1024 * 1024), 1)


def _ms(value: float) -> float | None:
    return None if math.isinf(value) else round(value * 1000, 1)


def _first_tracebacks(log: str, count: int) -> str:
    """The first COUNT different tracebacks of the log (Twisted indents them with a tab), each
    with the line that announced it."""
    lines = log.splitlines()
    blocks: dict[str, str] = {}  # by the announcing message and the exception line
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        block = [line]
        for follower in lines[i + 1 : i + 80]:
            if not follower.startswith(("\t", " ")) or not follower.strip():
                break
            block.append(follower)
        announced = lines[i - 1].split("] ", 1)[-1] if i else ""
        key = announced + "|" + block[-1]
        if key not in blocks:
            head = [lines[i - 1]] if i else []
            blocks[key] = "\n".join(text[:300] for text in head + block)
        if len(blocks) >= count:
            break
    return "\n".join(blocks.values())


def _check_honest(plan: Plan, result: HonestResult) -> list[str]:
    """Why this honest update did not end right (empty when it did)."""
    where = f"honest {plan.stack} (update {result.update_id or '-'})"
    if result.error:
        return [f"{where}: {result.error}"]
    problems = []
    if result.final_status != "succeeded":
        problems.append(f"{where}: status {result.final_status!r}, expected 'succeeded'")
    if result.events_seen != plan.event_count:
        problems.append(f"{where}: {result.events_seen} events read back, sent {plan.event_count}")
    export = result.export if isinstance(result.export, dict) else {}
    deployment = export.get("deployment") or {}
    got = list(deployment.get("resources") or [])
    if got != plan.resources:
        sent_urns = [r["urn"] for r in plan.resources]
        got_urns = [r.get("urn") for r in got]
        missing = sorted(set(sent_urns) - set(got_urns))
        extra = sorted(set(map(str, got_urns)) - set(sent_urns))
        changed = [g.get("urn") for g, s in zip(got, plan.resources, strict=False) if g != s][:5]
        problems.append(
            f"{where}: export has {len(got)} resources, sent {len(plan.resources)}; "
            f"missing {missing[:5]}, extra {extra[:5]}, differing (first 5) {changed}"
        )
    if deployment.get("pending_operations"):
        problems.append(f"{where}: export has pending operations")
    return problems


def test_load_with_a_hostile_neighbour(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(20260820)
    daemon = Daemon(workdir=tmp_path / "daemon")
    daemon.start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        plans = [
            make_plan(
                daemon.org,
                PROJECT,
                f"honest-{i:02d}",
                daemon.url,
                RESOURCES,
                JOURNAL_BATCHES,
                PAYLOAD_CHARS,
                rng,
            )
            for i in range(HONEST_CLIENTS)
        ]
        tickets = Tickets()
        hostile = Hostile(daemon.port, daemon.token, daemon.org, PROJECT, tickets, rng)
        hostile.set_up()
        idle = read_memory(pid)
        cpu_before = cpu_seconds(pid)

        stop = threading.Event()
        load_started = time.monotonic()
        deadline = load_started + MAX_LOAD_SECONDS
        barrier = threading.Barrier(HONEST_CLIENTS)
        clients = [
            HonestClient(daemon.port, daemon.token, plan, tickets, deadline) for plan in plans
        ]
        with ThreadPoolExecutor(max_workers=HONEST_CLIENTS + 3) as pool:
            try:
                memory_f: Future[MemoryStats] = pool.submit(
                    sample_memory,
                    pid,
                    stop,
                    deadline,
                    RSS_INTERVAL,
                    int(MAX_LOAD_SECONDS / RSS_INTERVAL) + 10,
                )
                probe_f: Future[ProbeStats] = pool.submit(
                    probe,
                    daemon.port,
                    daemon.token,
                    stop,
                    deadline,
                    PROBE_INTERVAL,
                    int(MAX_LOAD_SECONDS / PROBE_INTERVAL) + 10,
                )
                hostile_f: Future[HostileStats] = pool.submit(
                    hostile.run, stop, deadline, HOSTILE_MAX_REQUESTS
                )
                honest_fs = [pool.submit(c.run, barrier, THINK_SECONDS) for c in clients]
                wait_futures(honest_fs, timeout=MAX_LOAD_SECONDS + 40)
                honest_finished = time.monotonic() - load_started
                stop.wait(max(0.0, MIN_LOAD_SECONDS - (time.monotonic() - load_started)))
                stop.set()
                load_seconds = time.monotonic() - load_started
                results = [f.result(timeout=60) for f in honest_fs]
                probes = probe_f.result(timeout=60)
                memory = memory_f.result(timeout=60)
                attacks = hostile_f.result(timeout=60)
            finally:
                stop.set()  # also on the way out of an error: no loop outlives the test
        cpu_after = cpu_seconds(pid)
        alive = daemon.running
    finally:
        if daemon.running:
            daemon.stop()
    log = daemon.log_text(tail=50_000_000)

    # -- the figures -------------------------------------------------------------------------
    p99 = probes.percentile(0.99)
    tracebacks = log.count("Traceback (most recent call last)")
    figures: dict[str, Any] = {
        "load_seconds": round(load_seconds, 1),
        "honest_finished_seconds": round(honest_finished, 1),
        "test_seconds": round(time.monotonic() - started, 1),
        "honest_updates": len(results),
        "honest_ok": sum(1 for p, r in zip(plans, results, strict=True) if not _check_honest(p, r)),
        "honest_requests": sum(r.requests for r in results),
        "honest_retries": sum(r.retries for r in results),
        "honest_slowest_seconds": round(max(r.seconds for r in results), 1),
        "probe_count": len(probes.latencies),
        "probe_failures": len(probes.failures),
        "probe_p50_ms": _ms(probes.percentile(0.50)),
        "probe_p99_ms": _ms(p99),
        "probe_max_ms": _ms(probes.percentile(1.0)),
        "p99_limit_ms": _ms(P99_LIMIT),
        "rss_idle_mib": _mib(idle[0]) if idle else None,
        "rss_max_mib": _mib(memory.max_rss),
        "rss_hwm_mib": _mib(memory.hwm),
        "rss_limit_mib": _mib(RSS_LIMIT),
        "rss_samples": len(memory.samples),
        "daemon_cpu_seconds": (
            round(cpu_after - cpu_before, 1)
            if cpu_before is not None and cpu_after is not None
            else None
        ),
        "hostile_requests": attacks.sent,
        "hostile_per_second": round(attacks.sent / max(attacks.seconds, 1e-9), 1),
        "hostile_5xx": attacks.five_xx,
        "hostile_2xx": attacks.two_xx,
        "hostile_no_answer": attacks.no_answer,
        "hostile_setup": attacks.setup or "ok",
        "hostile_by_kind": attacks.table(),
        "hostile_5xx_examples": attacks.server_errors[:10],
        "hostile_2xx_examples": attacks.accepted[:10],
        "probe_failure_examples": probes.failures[:5],
        "daemon_tracebacks": tracebacks,
        "daemon_alive_after_load": alive,
    }
    report = tmp_path / "load-figures.json"
    report.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"\nload with a hostile neighbour: {figures['honest_ok']}/{len(results)} honest updates "
        f"exact, GET /api/user p99 {figures['probe_p99_ms']} ms (limit {P99_LIMIT * 1000:.0f}) "
        f"over {len(probes.latencies)} probes, daemon max RSS {figures['rss_max_mib']} MiB "
        f"(limit {figures['rss_limit_mib']}), hostile sent {attacks.sent} requests, "
        f"{attacks.five_xx} got 5xx, {attacks.two_xx} got 2xx; load {load_seconds:.1f}s; "
        f"figures in {report}"
    )

    # -- the assertions (all evaluated, reported together) -----------------------------------
    problems: list[str] = []
    for plan, result in zip(plans, results, strict=True):
        problems += _check_honest(plan, result)
    if not alive:
        problems.append("the daemon died during the load")
    if attacks.setup:
        problems.append(f"the hostile client could not set up its own update: {attacks.setup}")
    if not p99 < P99_LIMIT:
        problems.append(
            f"GET /api/user p99 {figures['probe_p99_ms']} ms >= {P99_LIMIT * 1000:.0f} ms "
            f"(p50 {figures['probe_p50_ms']}, max {figures['probe_max_ms']} ms, "
            f"{len(probes.failures)} failed probes {probes.failures[:3]})"
        )
    if not memory.max_rss < RSS_LIMIT:
        problems.append(
            f"daemon VmRSS reached {_mib(memory.max_rss)} MiB >= {_mib(RSS_LIMIT)} MiB "
            f"(idle {figures['rss_idle_mib']} MiB)"
        )
    if attacks.five_xx:
        problems.append(
            f"the hostile client got {attacks.five_xx} 5xx answers, e.g.\n  "
            + "\n  ".join(attacks.server_errors[:10])
        )
    if attacks.two_xx:
        problems.append(
            f"the daemon accepted {attacks.two_xx} hostile requests, e.g.\n  "
            + "\n  ".join(attacks.accepted[:10])
        )
    if tracebacks:
        problems.append(
            f"the daemon log has {tracebacks} tracebacks, e.g.\n" + _first_tracebacks(log, 3)
        )
    assert not problems, "\n".join(problems)
