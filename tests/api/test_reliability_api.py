"""Issue 13 over a real loopback port: the door (1), storage faults (8), secrets at rest (9)
and Pulumi Cloud's documented history semantics (11)."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import UNKNOWN_LENGTH, FileBodyProducer

from pulumid.api.http import LimitedRequest
from pulumid.storage.sqlite import SQLiteStore
from tests.api.test_api import (
    ORG,
    TOKEN,
    Server,
    create_stack,
    deployment,
    serve,
    stack_path,
    start_update,
)

pytestmark = pytest.mark.live

BIG = 8 * 1024 * 1024


@asynccontextmanager
async def recording(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Server, list[int]]]:
    """A server whose requests report how many body bytes they buffered."""
    buffered: list[int] = []
    original = LimitedRequest.finish

    def finish(self: LimitedRequest) -> None:
        buffered.append(self.content.seek(0, 2) if self.content is not None else 0)
        original(self)

    LimitedRequest.finish = finish  # type: ignore[method-assign,assignment]
    try:
        async with serve(tmp_path, **overrides) as server:
            yield server, buffered
    finally:
        LimitedRequest.finish = original  # type: ignore[method-assign]


# -- 1: no work before authentication ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_1_bodies_without_a_valid_credential_are_never_buffered(tmp_path: Path) -> None:
    async with recording(tmp_path) as (server, buffered):
        base = await create_stack(server)
        update_id, token = await start_update(server, base)
        other_base = await create_stack(server, "other")
        other_id, other_token = await start_update(server, other_base)
        junk = b"x" * BIG
        bomb = zlib.compress(b"\0" * (64 * 1024 * 1024))
        checkpoint = f"{base}/update/{update_id}/checkpoint"
        cases: list[tuple[str, str, Any, dict[str, str], int]] = [
            ("POST", f"/api/stacks/{ORG}/web", None, {}, 401),
            ("POST", f"/api/stacks/{ORG}/web", "token wrong-token", {}, 401),
            ("PATCH", checkpoint, None, {}, 403),
            ("PATCH", checkpoint, "update-token not-a-token", {}, 403),
            ("PATCH", checkpoint, "token wrong-token", {}, 403),
            ("POST", f"{base}/update/{update_id}/events/batch", "update-token nope", {}, 403),
            ("POST", f"{base}/import", "Bearer x", {"Content-Encoding": "gzip"}, 401),
        ]
        before = len(buffered)
        for method, path, auth, headers, status in cases:
            data = bomb if headers else junk
            reply = await server.call(method, path, data=data, auth=auth, headers=headers)
            reply.assert_error(status)
        assert buffered[before:] == [0] * len(cases)
        # Another update's real token gets in the door, but the lease check comes before
        # the body is decompressed or parsed.
        reply = await server.call(
            "PATCH",
            checkpoint,
            data=bomb,
            auth=f"update-token {other_token}",
            headers={"Content-Encoding": "gzip"},
        )
        reply.assert_error(403)
        # The honest update goes on.
        body = json.dumps(deployment([])).encode()
        reply = await server.call("PATCH", checkpoint, data=body, auth=f"update-token {token}")
        assert reply.code == 204, reply.body
        assert buffered[-1] == len(body)
        assert other_id != update_id


@pytest_twisted.ensureDeferred
async def test_1_a_streamed_body_waits_for_the_token_lookup(tmp_path: Path) -> None:
    """A chunked body of unknown length: reading pauses while the token is looked up."""
    async with recording(tmp_path) as (server, buffered):
        base = await create_stack(server)
        update_id, token = await start_update(server, base)
        path = f"{base}/update/{update_id}/checkpoint"
        body = json.dumps(deployment([{"urn": "u", "type": "t", "custom": True}])).encode()
        for auth, status in ((f"update-token {token}", 204), ("update-token forged", 403)):
            producer = FileBodyProducer(BytesIO(body if status == 204 else b"y" * BIG))
            producer.length = UNKNOWN_LENGTH  # chunked: no Content-Length
            reply = await server.call("PATCH", path, data=producer, auth=auth)
            assert reply.code == status, reply.body
        assert buffered[-2:] == [len(body), 0]


@pytest_twisted.ensureDeferred
async def test_1_non_utf8_urls_get_a_json_400(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        for path in ("/api/stacks/acme/%ff%fe/s/export", "/%c3%28"):
            (await server.call("GET", path)).assert_error(400)


# -- 8: storage faults ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_8_an_io_error_at_commit_is_a_503_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        store = server.backend.store
        assert isinstance(store, SQLiteStore)
        store.faults.arm("ioerror", "commit")
        reply = await server.call("POST", f"/api/stacks/{ORG}/web", {"stackName": "dev"})
        reply.assert_error(503)
        (await server.call("GET", stack_path())).assert_error(404)  # nothing half-written
        await create_stack(server)  # the connection recovered; the retry succeeds

        # COMMIT fails and so does the ROLLBACK after it: the original error is reported,
        # and the next transaction rolls back what was left open before it begins.
        base = stack_path()
        update_id, token = await start_update(server, base)
        await server.backend.auth.audit.flush()  # its audit rows are another commit
        store.faults.arm("ioerror", "commit")
        store.faults.arm("ioerror", "rollback")
        path = f"{base}/update/{update_id}/checkpoint"
        body = deployment([{"urn": "u1", "type": "t", "custom": True}])
        reply = await server.call("PATCH", path, body, auth=f"update-token {token}")
        reply.assert_error(503)
        exported = await server.ok("GET", f"{base}/export")
        assert exported["deployment"].get("resources") in (None, [])
        reply = await server.call("PATCH", path, body, auth=f"update-token {token}")
        assert reply.code == 204, reply.body
        complete = f"{base}/update/{update_id}/complete"
        reply = await server.call(
            "POST", complete, {"status": "succeeded"}, auth=f"update-token {token}"
        )
        assert reply.code == 204, reply.body
        exported = await server.ok("GET", f"{base}/export")
        assert [r["urn"] for r in exported["deployment"]["resources"]] == ["u1"]


@pytest_twisted.ensureDeferred
async def test_8_a_failed_journal_commit_can_be_retried(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        store = server.backend.store
        assert isinstance(store, SQLiteStore)
        base = await create_stack(server)
        created = await server.ok("POST", f"{base}/update", {"options": {}})
        update_id = created["updateID"]
        started = await server.ok("POST", f"{base}/update/{update_id}", {"journalVersion": 1})
        auth = f"update-token {started['token']}"
        state = {"urn": "urn:pulumi:dev::web::t:index:X::a", "custom": True, "type": "t:index:X"}
        entries = {
            "entries": [
                {"version": 1, "kind": 0, "sequenceID": 1, "operationID": 1},
                {"version": 1, "kind": 1, "sequenceID": 2, "operationID": 1, "state": state},
            ]
        }
        path = f"{base}/update/{update_id}/journalentries"
        await server.backend.auth.audit.flush()  # its audit rows are another commit
        store.faults.arm("ioerror", "commit")
        (await server.call("PATCH", path, entries, auth=auth)).assert_error(503)
        # The CLI retries the same batch: it is applied once, not twice and not zero times.
        assert (await server.call("PATCH", path, entries, auth=auth)).code == 204
        complete = f"{base}/update/{update_id}/complete"
        assert (await server.call("POST", complete, {"status": "succeeded"}, auth=auth)).code == 204
        exported = await server.ok("GET", f"{base}/export")
        assert [r["urn"] for r in exported["deployment"]["resources"]] == [state["urn"]]


# -- 9: secrets at rest ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_9_update_tokens_are_stored_hashed(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        _update_id, token = await start_update(server, base)
        files = sorted(tmp_path.glob("db.sqlite*"))
        assert files
        for path in files:
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
                assert TOKEN.encode() not in path.read_bytes(), path


# -- 11: documented history semantics -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_11_history_pages_versions_summaries_and_previews(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        ids = []
        for dry_run in (True, False, True, False):
            update_id, token = await start_update(server, base, dry_run=dry_run)
            complete = f"{base}/update/{update_id}/complete"
            reply = await server.call(
                "POST", complete, {"status": "succeeded"}, auth=f"update-token {token}"
            )
            assert reply.code == 204
            ids.append(update_id)
        history = (await server.ok("GET", f"{base}/updates?page=0"))["updates"]
        assert [u["updateID"] for u in history] == [ids[3], ids[2], ids[1], ids[0]]
        assert [u["kind"] for u in history] == ["update", "preview", "update", "preview"]
        assert (await server.ok("GET", f"{base}/updates"))["updates"] == history
        paged = (await server.ok("GET", f"{base}/updates?page=2&pageSize=1"))["updates"]
        assert [u["updateID"] for u in paged] == [ids[2]]
        (await server.call("GET", f"{base}/updates?page=1&pageSize=0")).assert_error(400)
        latest = await server.ok("GET", f"{base}/updates/latest")
        assert latest["updateID"] == ids[3] and latest["version"] == 2
        first = await server.ok("GET", f"{base}/updates/1")
        assert first["updateID"] == ids[1] and first["latestVersion"] == 2
        assert first["info"]["kind"] == "update" and first["info"]["result"] == "succeeded"
        summary = await server.ok("GET", f"{base}/updates/1/summary")
        assert set(summary) == {"result", "startTime", "endTime", "resourceCount"}
        assert summary["result"] == "succeeded"
        (await server.call("GET", f"{base}/updates/3")).assert_error(404)
        (await server.call("GET", f"{base}/updates/0/summary")).assert_error(400)
        (await server.call("GET", f"{base}/updates/99999999999999999999")).assert_error(400)
