"""Server-side micro benchmarks: pulumid's HTTP API driven directly over loopback.

    python -m benchmarks.micro [--only events,checkpoint,concurrent,memory,journal,delta]

No CLI is involved: requests are shaped like the ones `pulumi` sends (gzipped checkpoint
bodies, batches of engine events, update tokens), built once up front so that only the
server's work is timed. Each benchmark starts its own fresh daemon (a new database).

- events      POST .../events/batch throughput (events per second), batches of 50
- checkpoint  PATCH .../checkpoint latency and GET .../export latency against state size
              (10/100/600 resources of 16 KB each)
- concurrent  many stacks updating at once (20 threads, each a loop of create update /
              start / checkpoint / events / complete on its own stack): total throughput,
              and the slowest loop and request (does any stack block the others?)
- memory      resident memory (VmRSS from /proc) of the daemon after 20 and after 2,000
              stacks with small states
- journal     PATCH .../journalentries throughput        } hooks for endpoints that are not
- delta       PATCH .../checkpointdelta latency           } there yet: skipped with a note
                                                          } when the server answers 404/400
- inflight    peak resident memory with 10 updates of the largest size journaling and
              completing at once, against the sum of their states
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from benchmarks.common import (
    REPO,
    BenchmarkError,
    Server,
    ServerUsage,
    chosen_names,
    free_port,
    new_token,
    positive_ints,
    pulumid_server,
    rss_kib,
)

ORG = "acme"
PROJECT = "micro"
PAYLOAD_SIZE = 16384
CLI_VERSION = "v3.259.0"
BENCHMARKS = ("events", "checkpoint", "concurrent", "memory", "journal", "delta", "inflight")


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Response:
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Unsupported(Exception):
    """The server does not implement an endpoint (it answered 404, or 400 'not supported')."""


class Client:
    """One keep-alive connection to the daemon (use one per thread)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def close(self) -> None:
        self.conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        lease: str | None = None,
        gzipped: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        all_headers = {
            "Accept": "application/vnd.pulumi+8",
            "Authorization": f"update-token {lease}" if lease else f"token {self.token}",
        }
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if gzipped:
            all_headers["Content-Encoding"] = "gzip"
        all_headers.update(headers or {})
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=all_headers)
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            # A dropped keep-alive connection: reconnect once.
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            self.conn.request(method, path, body=body, headers=all_headers)
            response = self.conn.getresponse()
            data = response.read()
        return Response(response.status, data, time.perf_counter() - start)

    def ok(self, method: str, path: str, body: bytes | None = None, **kw: Any) -> Response:
        response = self.request(method, path, body, **kw)
        if not response.ok:
            raise BenchmarkError(f"{method} {path} -> {response.status} {response.body[:500]!r}")
        return response


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# The API, as the CLI uses it


@dataclass
class Update:
    stack: str
    update_id: str
    lease: str
    journal_version: int = 0

    @property
    def path(self) -> str:
        return f"/api/stacks/{ORG}/{PROJECT}/{self.stack}/update/{self.update_id}"


def create_stack(client: Client, stack: str) -> None:
    client.ok("POST", f"/api/stacks/{ORG}/{PROJECT}", _json({"stackName": stack}))


def begin_update(client: Client, stack: str, journal_version: int = 0) -> Update:
    body = {
        "name": PROJECT,
        "runtime": "yaml",
        "main": "",
        "description": "",
        "options": {"parallel": 16, "skipPreview": True},
        "config": {},
        "metadata": {"message": "", "environment": {}},
    }
    created = client.ok("POST", f"/api/stacks/{ORG}/{PROJECT}/{stack}/update", _json(body))
    update_id = str(created.json()["updateID"])
    start: dict[str, Any] = {"tags": {}}
    if journal_version:
        start["journalVersion"] = journal_version
    path = f"/api/stacks/{ORG}/{PROJECT}/{stack}/update/{update_id}"
    started = client.ok("POST", path, _json(start)).json()
    return Update(stack, update_id, str(started["token"]), int(started.get("journalVersion") or 0))


def checkpoint(client: Client, update: Update, gz_body: bytes) -> Response:
    return client.ok(
        "PATCH", f"{update.path}/checkpoint", gz_body, lease=update.lease, gzipped=True
    )


def post_events(client: Client, update: Update, gz_body: bytes) -> Response:
    return client.ok(
        "POST", f"{update.path}/events/batch", gz_body, lease=update.lease, gzipped=True
    )


def complete(client: Client, update: Update) -> Response:
    return client.ok(
        "POST", f"{update.path}/complete", _json({"status": "succeeded"}), lease=update.lease
    )


def export(client: Client, stack: str, *, accept_gzip: bool) -> Response:
    headers = {"Accept-Encoding": "gzip"} if accept_gzip else {}
    return client.ok("GET", f"/api/stacks/{ORG}/{PROJECT}/{stack}/export", headers=headers)


# --------------------------------------------------------------------------------------------
# States shaped like the CLI's (the test provider's items, 16 KB payload each)


def _urn(stack: str, type_: str, name: str) -> str:
    return f"urn:pulumi:{stack}::{PROJECT}::{type_}::{name}"


def _payload(name: str, size: int) -> str:
    unit = (name + "/").encode().hex()
    return (unit * (size // len(unit) + 1))[:size]


def resources(stack: str, count: int, payload_size: int = PAYLOAD_SIZE) -> list[dict[str, Any]]:
    """The stack resource, the default provider and COUNT items, as in the CLI's state."""
    stack_urn = _urn(stack, "pulumi:pulumi:Stack", f"{PROJECT}-{stack}")
    provider_urn = _urn(stack, "pulumi:providers:pulumidtest", "default")
    provider_id = "8a1f0b4e-8c35-4b8e-9a4c-2b1d7e9c0f11"
    now = "2026-01-01T00:00:00.000000000Z"
    result: list[dict[str, Any]] = [
        {
            "urn": stack_urn,
            "custom": False,
            "type": "pulumi:pulumi:Stack",
            "outputs": {"count": count},
            "created": now,
            "modified": now,
        },
        {
            "urn": provider_urn,
            "custom": True,
            "id": provider_id,
            "type": "pulumi:providers:pulumidtest",
            "inputs": {"__internal": {"pluginDownloadURL": ""}},
            "outputs": {},
            "created": now,
            "modified": now,
        },
    ]
    for i in range(count):
        name = f"extra{i}"
        inputs: dict[str, Any] = {"name": name, "payloadSize": payload_size}
        outputs = dict(inputs)
        if payload_size:
            outputs["payload"] = _payload(name, payload_size)
        result.append(
            {
                "urn": _urn(stack, "pulumidtest:index:Item", name),
                "custom": True,
                "id": f"{name}-id",
                "type": "pulumidtest:index:Item",
                "inputs": inputs,
                "outputs": outputs,
                "parent": stack_urn,
                "provider": f"{provider_urn}::{provider_id}",
                "propertyDependencies": {"name": [], "payloadSize": []},
                "created": now,
                "modified": now,
            }
        )
    return result


def deployment_head(stack: str) -> str:
    """`{"version":3,"deployment":{"manifest":...,"secrets_providers":...,"metadata":{}`, as
    the CLI marshals it (compact, this key order)."""
    manifest = {"time": "2026-01-01T00:00:00Z", "magic": "", "version": CLI_VERSION}
    secrets = {
        "type": "service",
        "state": {"url": "http://127.0.0.1", "owner": ORG, "project": PROJECT, "stack": stack},
    }
    return (
        '{"version":3,"deployment":{"manifest":'
        + json.dumps(manifest, separators=(",", ":"))
        + ',"secrets_providers":'
        + json.dumps(secrets, separators=(",", ":"))
        + ',"metadata":{}'
    )


@dataclass
class SpannedDeployment:
    """An UntypedDeployment's exact text with the byte span of every resource, as the CLI
    keeps it for checkpoint deltas (pkg/backend/httpstate/diffs.go)."""

    text: bytes
    spans: list[tuple[int, int]]

    @classmethod
    def build(cls, stack: str, items: Sequence[Mapping[str, Any]]) -> SpannedDeployment:
        parts = [deployment_head(stack).encode(), b',"resources":[']
        offset = sum(len(p) for p in parts)
        spans: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            if i:
                parts.append(b",")
                offset += 1
            encoded = _json(item)
            spans.append((offset, offset + len(encoded)))
            parts.append(encoded)
            offset += len(encoded)
        parts.append(b"]}}")
        return cls(b"".join(parts), spans)

    def replace(self, index: int, item: Mapping[str, Any]) -> tuple[SpannedDeployment, bytes]:
        """The deployment with resource INDEX replaced, and the delta (gotextdiff edits)."""
        start, end = self.spans[index]
        encoded = _json(item)
        text = self.text[:start] + encoded + self.text[end:]
        shift = len(encoded) - (end - start)
        spans = list(self.spans[:index])
        spans.append((start, start + len(encoded)))
        spans += [(s + shift, e + shift) for s, e in self.spans[index + 1 :]]
        edit = {
            "Span": {
                "uri": "",
                "start": {"line": 1, "column": 0, "offset": start},
                "end": {"line": 1, "column": 0, "offset": end},
            },
            "NewText": encoded.decode(),
        }
        return SpannedDeployment(text, spans), _json([edit])


def checkpoint_body(stack: str, count: int, payload_size: int = PAYLOAD_SIZE) -> bytes:
    """A PATCH .../checkpoint body: {"version":3,"deployment":{...}} (uncompressed)."""
    return SpannedDeployment.build(stack, resources(stack, count, payload_size)).text


def engine_events(start: int, count: int, stack: str) -> list[dict[str, Any]]:
    """Engine events roughly like the CLI's (a resource pre-event and its outputs event)."""
    events: list[dict[str, Any]] = []
    for n in range(start, start + count):
        name = f"extra{n // 2}"
        urn = _urn(stack, "pulumidtest:index:Item", name)
        metadata = {
            "op": "create",
            "urn": urn,
            "type": "pulumidtest:index:Item",
            "old": None,
            "new": {
                "type": "pulumidtest:index:Item",
                "urn": urn,
                "custom": True,
                "id": "",
                "parent": _urn(stack, "pulumi:pulumi:Stack", f"{PROJECT}-{stack}"),
                "inputs": {"name": name, "payloadSize": 16384},
                "outputs": {},
                "provider": "",
            },
            "detailedDiff": None,
            "provider": "",
        }
        kind = "resourcePreEvent" if n % 2 == 0 else "resOutputsEvent"
        events.append(
            {
                "sequence": n,
                "timestamp": int(time.time()),
                kind: {"metadata": metadata, "planning": False},
            }
        )
    return events


# --------------------------------------------------------------------------------------------
# Running a daemon


@dataclass
class Daemon:
    server: Server
    port: int
    token: str

    @property
    def pid(self) -> int:
        return self.server.pid


@contextmanager
def daemon(source: Path, label: str, extra_args: Sequence[str] = ()) -> Iterator[Daemon]:
    """A fresh pulumid (new database in a temporary directory) for one benchmark."""
    with TemporaryDirectory(prefix=f"pulumid-micro-{label}-") as tmp:
        port, token = free_port(), new_token()
        server = pulumid_server(
            Path(tmp), port=port, token=token, source=source, extra_args=extra_args
        )
        server.start()
        try:
            yield Daemon(server, port, token)
        finally:
            server.stop()


def client_for(running: Daemon) -> Client:
    return Client(running.port, running.token)


# --------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.rows:
            lines.append("| " + " | ".join(self.columns) + " |")
            lines.append(
                "|" + "|".join("---:" if i else "---" for i in range(len(self.columns))) + "|"
            )
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024 / 1024:.2f} MB" if nbytes >= 1024 * 1024 else f"{nbytes / 1024:.1f} KB"


@dataclass
class Settings:
    source: Path
    pulumid_args: Sequence[str]
    events: int
    event_batch: int
    sizes: Sequence[int]
    repeats: int
    concurrent: int
    loops: int
    stacks: int
    few_stacks: int
    inflight: int = 10


# --------------------------------------------------------------------------------------------
# The benchmarks


def bench_events(s: Settings) -> Table:
    table = Table(
        "events/batch throughput",
        ["batch size", "events", "requests", "seconds", "events/s", "p50 request ms", "max ms"],
    )
    with daemon(s.source, "events", s.pulumid_args) as server:
        client = client_for(server)
        for batch in sorted({1, s.event_batch}):
            stack = f"events{batch}"
            create_stack(client, stack)
            update = begin_update(client, stack)
            total = s.events if batch > 1 else min(s.events, 2000)
            bodies = [
                gzip.compress(_json({"events": engine_events(n, min(batch, total - n), stack)}))
                for n in range(0, total, batch)
            ]
            latencies: list[float] = []
            start = time.perf_counter()
            for body in bodies:
                latencies.append(post_events(client, update, body).seconds)
            complete(client, update)  # flushes the buffered events to the database
            elapsed = time.perf_counter() - start
            table.rows.append(
                [
                    str(batch),
                    str(total),
                    str(len(bodies)),
                    f"{elapsed:.2f}",
                    f"{total / elapsed:,.0f}",
                    _ms(statistics.median(latencies)),
                    _ms(max(latencies)),
                ]
            )
        client.close()
    table.notes.append("Seconds include the final POST .../complete, which flushes the events.")
    return table


def bench_checkpoint(s: Settings) -> Table:
    table = Table(
        "checkpoint and export latency against state size",
        [
            "resources",
            "state",
            "gzipped",
            "checkpoint p50 ms",
            "checkpoint max ms",
            "export gzip p50 ms",
            "export plain p50 ms",
        ],
    )
    with daemon(s.source, "checkpoint", s.pulumid_args) as server:
        client = client_for(server)
        for count in s.sizes:
            stack = f"size{count}"
            create_stack(client, stack)
            update = begin_update(client, stack)
            body = checkpoint_body(stack, count)
            gz = gzip.compress(body, 6)
            times = [checkpoint(client, update, gz).seconds for _ in range(s.repeats)]
            complete(client, update)
            gz_exports = [export(client, stack, accept_gzip=True).seconds for _ in range(s.repeats)]
            plain = [export(client, stack, accept_gzip=False) for _ in range(s.repeats)]
            if (
                json.loads(plain[-1].body)["deployment"]["resources"][-1]["urn"]
                not in body.decode()
            ):
                raise BenchmarkError("the exported state is not the checkpointed one")
            table.rows.append(
                [
                    str(count),
                    _size(len(body)),
                    _size(len(gz)),
                    _ms(statistics.median(times)),
                    _ms(max(times)),
                    _ms(statistics.median(gz_exports)),
                    _ms(statistics.median(r.seconds for r in plain)),
                ]
            )
        client.close()
    table.notes.append(
        f"{s.repeats} full PATCH .../checkpoint requests per size (gzipped, as the CLI sends "
        "them) within one update, then as many exports."
    )
    return table


def _update_loops(
    client: Client, stack: str, loops: int, gz_checkpoint: bytes, gz_events: bytes
) -> tuple[list[float], float]:
    """LOOPS updates on STACK: (seconds per loop, the slowest single request)."""
    loop_times: list[float] = []
    slowest = 0.0
    for _ in range(loops):
        start = time.perf_counter()
        update = begin_update(client, stack)
        for response in (
            post_events(client, update, gz_events),
            checkpoint(client, update, gz_checkpoint),
            complete(client, update),
        ):
            slowest = max(slowest, response.seconds)
        loop_times.append(time.perf_counter() - start)
    return loop_times, slowest


def _in_threads(work: Callable[[Any], Any], inputs: Sequence[Any]) -> list[Any]:
    """WORK(input) for every input, each in its own thread, all released at once by a
    barrier; the results in input order. Any failure is a BenchmarkError."""
    results: list[Any] = [None] * len(inputs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(inputs[index])
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchmarkError(f"{len(errors)} of {len(inputs)} threads failed: {errors[0]!r}")
    return results


def bench_concurrent(s: Settings) -> Table:
    table = Table(
        "many stacks updating at once",
        [
            "stacks at once",
            "updates",
            "seconds",
            "updates/s",
            "loop p50 ms",
            "loop p95 ms",
            "loop max ms",
            "slowest request ms",
            "finish spread s",
        ],
    )
    count = 10
    with daemon(s.source, "concurrent", s.pulumid_args) as server:
        for parallel in sorted({1, s.concurrent}):
            setup = client_for(server)
            jobs: list[tuple[str, bytes, bytes]] = []
            for i in range(parallel):
                stack = f"c{parallel}-{i}"
                create_stack(setup, stack)
                jobs.append(
                    (
                        stack,
                        gzip.compress(checkpoint_body(stack, count)),
                        gzip.compress(_json({"events": engine_events(0, 2 * count, stack)})),
                    )
                )
            setup.close()

            def loops(job: tuple[str, bytes, bytes]) -> tuple[list[float], float, float]:
                client = client_for(server)
                try:
                    times, slowest = _update_loops(client, job[0], s.loops, job[1], job[2])
                finally:
                    client.close()
                return times, slowest, time.perf_counter()

            start = time.perf_counter()
            results = _in_threads(loops, jobs)
            elapsed = time.perf_counter() - start
            all_loops = sorted(t for times, _, _ in results for t in times)
            finishes = [end for _, _, end in results]
            updates = len(all_loops)
            table.rows.append(
                [
                    str(parallel),
                    str(updates),
                    f"{elapsed:.2f}",
                    f"{updates / elapsed:.1f}",
                    _ms(statistics.median(all_loops)),
                    _ms(all_loops[min(len(all_loops) - 1, int(0.95 * len(all_loops)))]),
                    _ms(all_loops[-1]),
                    _ms(max(slowest for _, slowest, _ in results)),
                    f"{max(finishes) - min(finishes):.2f}",
                ]
            )
    table.notes.append(
        f"Each stack runs {s.loops} loops of: create update, start, one events batch "
        f"({2 * count} events), one checkpoint ({count} resources of 16 KB), complete. "
        "All stacks start together; 'finish spread' is the time between the first and the "
        "last stack finishing (a blocked stack shows up there and in the maxima)."
    )
    return table


def bench_memory(s: Settings) -> Table:
    table = Table("resident memory against number of stacks", ["stacks", "VmRSS MB", "VmHWM MB"])
    with daemon(s.source, "memory", s.pulumid_args) as server:
        rss, hwm = rss_kib(server.pid)
        table.rows.append(["0", f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}"])
        made = 0

        def make(names: Sequence[str]) -> None:
            client = client_for(server)
            try:
                for stack in names:
                    create_stack(client, stack)
                    update = begin_update(client, stack)
                    checkpoint(client, update, gzip.compress(checkpoint_body(stack, 2, 64)))
                    complete(client, update)
            finally:
                client.close()

        for target in sorted({s.few_stacks, s.stacks}):
            names = [f"m{i}" for i in range(made, target)]
            _in_threads(make, [chunk for chunk in (names[i::4] for i in range(4)) if chunk])
            made = target
            time.sleep(1.0)  # let timed flushes settle
            rss, hwm = rss_kib(server.pid)
            table.rows.append([str(target), f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}"])
    table.notes.append(
        "Each stack: created, then one update with a checkpoint of a small state (stack, "
        "provider, 2 items with 64-byte payloads), completed. 4 client threads."
    )
    return table


def _unsupported(response: Response) -> bool:
    if response.status == 404:
        return True
    return response.status == 400 and b"not supported" in response.body.lower()


def _note(response: Response) -> str:
    return f"{response.status} {response.body[:200].decode(errors='replace')}"


# -- hooks for endpoints to come -------------------------------------------------------------


def journal_entries(update: Update, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Journal entries (apitype.JournalEntry, version 1) that create ITEMS: a Begin entry
    with the operation and a Success entry with the new state, per resource."""
    entries: list[dict[str, Any]] = []
    sequence = 0
    for operation_id, item in enumerate(items, start=1):
        sequence += 1
        entries.append(
            {
                "version": 1,
                "kind": 0,  # begin
                "sequenceID": sequence,
                "operationID": operation_id,
                "removeOld": None,
                "removeNew": None,
                "operation": {"resource": _without_outputs(item), "type": "creating"},
            }
        )
        sequence += 1
        entries.append(
            {
                "version": 1,
                "kind": 1,  # success
                "sequenceID": sequence,
                "operationID": operation_id,
                "removeOld": None,
                "removeNew": None,
                "state": item,
            }
        )
    return entries


def _without_outputs(item: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in item.items() if key != "outputs"}


def patch_journal_entries(client: Client, update: Update, entries: Sequence[Any]) -> Response:
    """PATCH .../journalentries {"entries": [...]} (gzipped, as the CLI sends it)."""
    body = gzip.compress(_json({"entries": list(entries)}))
    return client.request(
        "PATCH", f"{update.path}/journalentries", body, lease=update.lease, gzipped=True
    )


def patch_checkpoint_delta(
    client: Client, update: Update, sequence: int, new_text: bytes, delta: bytes
) -> Response:
    """PATCH .../checkpointdelta (apitype.PatchUpdateCheckpointDeltaRequest)."""
    body = (
        b'{"version":3,"checkpointHash":"'
        + hashlib.sha256(new_text).hexdigest().encode()
        + b'","sequenceNumber":'
        + str(sequence).encode()
        + b',"deploymentDelta":'
        + delta
        + b"}"
    )
    return client.request(
        "PATCH",
        f"{update.path}/checkpointdelta",
        gzip.compress(body),
        lease=update.lease,
        gzipped=True,
    )


def patch_checkpoint_verbatim(
    client: Client, update: Update, sequence: int, text: bytes
) -> Response:
    body = (
        b'{"version":3,"untypedDeployment":'
        + text
        + b',"sequenceNumber":'
        + str(sequence).encode()
        + b"}"
    )
    return client.request(
        "PATCH",
        f"{update.path}/checkpointverbatim",
        gzip.compress(body),
        lease=update.lease,
        gzipped=True,
    )


def bench_journal(s: Settings) -> Table:
    table = Table(
        "journal entries throughput (PATCH .../journalentries)",
        [
            "resources",
            "entries/request",
            "entries",
            "server CPU s",
            "entries per CPU-second",
            "wall s",
            "entries/s (wall)",
            "p50 request ms",
            "complete ms",
        ],
    )
    with daemon(s.source, "journal", s.pulumid_args) as server:
        client = client_for(server)
        for batch in (1, 50):
            count = max(s.sizes)
            stack = f"journal{batch}"
            create_stack(client, stack)
            update = begin_update(client, stack, journal_version=1)
            items = resources(stack, count)
            entries = journal_entries(update, items)
            # The bodies are built (and gzipped, as the CLI sends them) before the clock
            # starts: what is measured is the server.
            bodies = [
                gzip.compress(_json({"entries": entries[i : i + batch]}), 6)
                for i in range(0, len(entries), batch)
            ]
            del items
            usage = ServerUsage(lambda: [server.pid])
            latencies: list[float] = []
            usage.start()
            start = time.perf_counter()
            for body in bodies:
                response = client.request(
                    "PATCH", f"{update.path}/journalentries", body, lease=update.lease, gzipped=True
                )
                if _unsupported(response):
                    table.notes.append(
                        "SKIPPED: the server does not support journal entries "
                        f"(start answered journalVersion={update.journal_version}; "
                        f"PATCH .../journalentries -> {_note(response)})."
                    )
                    client.close()
                    return table
                if not response.ok:
                    raise BenchmarkError(f"PATCH journalentries -> {_note(response)}")
                latencies.append(response.seconds)
            completed = complete(client, update)
            elapsed = time.perf_counter() - start
            _peak, cpu = usage.stop()
            state = export(client, stack, accept_gzip=False).json()
            if len(state["deployment"].get("resources") or []) != count + 2:
                raise BenchmarkError("the state replayed from the journal misses resources")
            table.rows.append(
                [
                    str(count),
                    str(batch),
                    str(len(entries)),
                    f"{cpu:.2f}" if cpu is not None else "?",
                    f"{len(entries) / cpu:,.0f}" if cpu else "?",
                    f"{elapsed:.2f}",
                    f"{len(entries) / elapsed:,.0f}",
                    _ms(statistics.median(latencies)),
                    _ms(completed.seconds),
                ]
            )
        client.close()
    table.notes.append(
        "A Begin entry (the operation: the resource's inputs) and a Success entry (its state, "
        "16 KB) per resource; the request bodies are built and gzipped before timing. Server "
        "CPU is the daemon's user + system time over the PATCHes and the complete (which "
        "materialises the state), all its threads: entries per CPU-second is what one core "
        "sustains. Wall time also waits for an fsync per acknowledged batch."
    )
    return table


def bench_inflight(s: Settings) -> Table:
    """Several large updates at once: does the daemon's memory stay a bounded multiple of
    the states it serves?"""
    table = Table(
        "updates in flight at once: peak resident memory",
        [
            "updates at once",
            "resources each",
            "state each MB",
            "states MB",
            "idle RSS MiB",
            "peak RSS MiB",
            "peak above idle / one state",
            "peak above idle / all states",
            "wall s",
        ],
    )
    count, parallel = max(s.sizes), max(1, s.inflight)
    with daemon(s.source, "inflight", s.pulumid_args) as server:
        setup = client_for(server)
        jobs: list[tuple[Update, list[bytes]]] = []
        for i in range(parallel):
            stack = f"inflight{i}"
            create_stack(setup, stack)
            update = begin_update(setup, stack, journal_version=1)
            entries = journal_entries(update, resources(stack, count))
            bodies = [
                gzip.compress(_json({"entries": entries[j : j + 50]}), 6)
                for j in range(0, len(entries), 50)
            ]
            jobs.append((update, bodies))
            del entries
        idle = rss_kib(server.pid)[0] / 1024
        usage = ServerUsage(lambda: [server.pid])

        def run(job: tuple[Update, list[bytes]]) -> None:
            update, bodies = job
            client = client_for(server)
            for body in bodies:
                response = client.request(
                    "PATCH", f"{update.path}/journalentries", body, lease=update.lease, gzipped=True
                )
                if not response.ok:
                    raise BenchmarkError(f"PATCH journalentries -> {_note(response)}")
            complete(client, update)
            client.close()

        usage.start()
        start = time.perf_counter()
        _in_threads(run, jobs)
        elapsed = time.perf_counter() - start
        peak, _cpu = usage.stop()
        state_bytes = len(export(setup, "inflight0", accept_gzip=False).body)
        setup.close()
    state_mb = state_bytes / 1e6
    above = ((peak or idle) - idle) * 1024 * 1024 / 1e6
    table.rows.append(
        [
            str(parallel),
            str(count),
            f"{state_mb:.1f}",
            f"{state_mb * parallel:.1f}",
            f"{idle:.0f}",
            f"{peak:.0f}" if peak is not None else "?",
            f"{above / state_mb:.2f}",
            f"{above / (state_mb * parallel):.2f}",
            f"{elapsed:.1f}",
        ]
    )
    table.notes.append(
        "Each update is a create of its own stack, journaled in batches of 50 entries (a Begin "
        "and a Success per resource, as the CLI sends them), all released at once, each "
        "ending with its complete (the state's materialisation). Idle RSS is measured after "
        "the stacks and updates exist, before the first entry; the peak is the daemon's "
        "VmHWM over the run. State size is one exported state, uncompressed."
    )
    return table


def bench_delta(s: Settings) -> Table:
    table = Table(
        "delta checkpoint latency (PATCH .../checkpointdelta)",
        ["resources", "state", "delta", "delta p50 ms", "delta max ms", "full p50 ms"],
    )
    with daemon(s.source, "delta", s.pulumid_args) as server:
        client = client_for(server)
        for count in s.sizes:
            stack = f"delta{count}"
            create_stack(client, stack)
            update = begin_update(client, stack)
            items = resources(stack, count)
            current = SpannedDeployment.build(stack, items)
            base = patch_checkpoint_verbatim(client, update, 1, current.text)
            if not base.ok:
                raise BenchmarkError(f"PATCH checkpointverbatim -> {_note(base)}")
            full = [
                patch_checkpoint_verbatim(client, update, 2 + i, current.text).seconds
                for i in range(s.repeats)
            ]
            sequence = 2 + s.repeats
            latencies: list[float] = []
            delta_size = 0
            for i in range(s.repeats):
                index = 2 + (i * 7919) % count  # an item (past the stack and provider)
                changed = dict(items[index])
                changed["modified"] = f"2026-01-02T00:00:{i % 60:02d}.000000000Z"
                current, delta = current.replace(index, changed)
                items[index] = changed
                response = patch_checkpoint_delta(client, update, sequence, current.text, delta)
                sequence += 1
                if _unsupported(response):
                    table.notes.append(
                        "SKIPPED: the server does not support checkpoint deltas "
                        f"(PATCH .../checkpointdelta -> {_note(response)})."
                    )
                    client.close()
                    return table
                if not response.ok:
                    raise BenchmarkError(f"PATCH checkpointdelta -> {_note(response)}")
                latencies.append(response.seconds)
                delta_size = len(delta)
            complete(client, update)
            exported = export(client, stack, accept_gzip=False).json()
            if exported["deployment"]["resources"][index]["modified"] != changed["modified"]:
                raise BenchmarkError("the exported state does not have the last delta applied")
            table.rows.append(
                [
                    str(count),
                    _size(len(current.text)),
                    _size(delta_size),
                    _ms(statistics.median(latencies)),
                    _ms(max(latencies)),
                    _ms(statistics.median(full)),
                ]
            )
        client.close()
    table.notes.append(
        "One resource changes per delta (as when one resource is updated); 'full' is the "
        "same state sent whole with PATCH .../checkpointverbatim."
    )
    return table


RUNNERS: dict[str, Callable[[Settings], Table]] = {
    "events": bench_events,
    "checkpoint": bench_checkpoint,
    "concurrent": bench_concurrent,
    "memory": bench_memory,
    "journal": bench_journal,
    "delta": bench_delta,
    "inflight": bench_inflight,
}


# --------------------------------------------------------------------------------------------
# The command line


def _names(text: str) -> list[str]:
    return chosen_names(text, list(BENCHMARKS))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.micro",
        description="Micro benchmarks of pulumid's HTTP API over loopback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
    )
    p.add_argument("--only", type=_names, default=list(BENCHMARKS), help="benchmarks to run")
    p.add_argument(
        "--sizes", type=positive_ints, default=[10, 100, 600], help="state sizes (resources)"
    )
    p.add_argument("--repeats", type=int, default=10, help="requests per size (10)")
    p.add_argument("--events", type=int, default=20000, help="events to post (20000)")
    p.add_argument("--event-batch", type=int, default=50, help="events per batch (50)")
    p.add_argument("--concurrent", type=int, default=20, help="stacks updating at once (20)")
    p.add_argument("--loops", type=int, default=10, help="updates per concurrent stack (10)")
    p.add_argument("--stacks", type=int, default=2000, help="stacks for the memory test (2000)")
    p.add_argument("--few-stacks", type=int, default=20, help="the small stack count (20)")
    p.add_argument("--inflight", type=int, default=10, help="updates at once for inflight (10)")
    p.add_argument(
        "--pulumid-source",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="the source tree whose pulumid package runs (default: this checkout)",
    )
    p.add_argument(
        "--pulumid-args",
        default="",
        metavar="ARGS",
        help="extra daemon flags, space-separated (e.g. --no-sync-commits)",
    )
    p.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings(
        source=args.pulumid_source.resolve(),
        pulumid_args=args.pulumid_args.split(),
        events=args.events,
        event_batch=args.event_batch,
        sizes=args.sizes,
        repeats=max(1, args.repeats),
        concurrent=args.concurrent,
        loops=args.loops,
        stacks=args.stacks,
        few_stacks=args.few_stacks,
        inflight=args.inflight,
    )
    rendered: list[str] = []
    try:
        for name in args.only:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            text = RUNNERS[name](settings).render()
            rendered.append(text)
            print(text, flush=True)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.write_text("# pulumid micro benchmarks\n\n" + "\n".join(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
