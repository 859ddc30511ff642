"""The HTTP API over a real loopback port, built the way `twistd pulumid` builds it."""

from __future__ import annotations

import base64
import gzip
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.web.client import (
    UNKNOWN_LENGTH,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers

from pulumid.config import Config
from pulumid.engine.backend import Backend
from pulumid.tap import make_backend, make_site

pytestmark = pytest.mark.live

TOKEN = "api-test-token-1"
KEY = "0123456789abcdef" * 4
ORG = "acme"
USER = "alice"
ANOTHER_UPDATE = "Conflict: Another update is currently in progress."
STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."
_DEFAULT = object()


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def assert_error(self, code: int) -> str:
        """Every non-2xx answer is {"code": status, "message": str}."""
        assert self.code == code, (self.code, self.body)
        assert self.header("content-type") == "application/json"
        body = self.json()
        assert set(body) == {"code", "message"}, body
        assert body["code"] == code
        assert isinstance(body["message"], str) and body["message"]
        message: str = body["message"]
        return message


@dataclass
class Server:
    url: str
    client: HTTPClient
    agent: Agent
    backend: Backend

    async def raw_get(self, path: str, headers: dict[str, str]) -> Reply:
        """A GET without treq, which would decode a gzip response on its own."""
        all_headers = {"Authorization": [f"token {TOKEN}"]}
        all_headers.update({name: [value] for name, value in headers.items()})
        response = await self.agent.request(
            b"GET", (self.url + path).encode(), Headers(all_headers)
        )
        return Reply(response.code, response.headers, await readBody(response))

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | FileBodyProducer | None = None,
        auth: Any = _DEFAULT,
        headers: dict[str, str] | None = None,
        gzipped: bool = False,
    ) -> Reply:
        all_headers: dict[str, list[str]] = {}
        if auth is _DEFAULT:
            auth = f"token {TOKEN}"
        if auth is not None:
            all_headers["Authorization"] = [auth]
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = ["application/json"]
        if gzipped:
            assert isinstance(data, bytes)
            data = gzip.compress(data)
            all_headers["Content-Encoding"] = ["gzip"]
        for name, value in (headers or {}).items():
            all_headers[name] = [value]
        response = await self.client.request(
            method, self.url + path, headers=Headers(all_headers), data=data
        )
        content = await response.content()
        return Reply(response.code, response.headers, content)

    async def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        reply = await self.call(method, path, body, **kwargs)
        assert 200 <= reply.code < 300, (method, path, reply.code, reply.body)
        return reply.json() if reply.body else None


@asynccontextmanager
async def serve(tmp_path: Path, **overrides: Any) -> AsyncIterator[Server]:
    settings: dict[str, Any] = {
        "database": str(tmp_path / "db.sqlite"),
        "token": TOKEN,
        "master_key": KEY,
        "organization": ORG,
        "user": USER,
        **overrides,
    }
    config = Config(**settings)
    top, backend = make_backend(config, reactor)
    top.startService()
    site = make_site(backend)
    port: IListeningPort = cast(Any, reactor).listenTCP(0, site, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    try:
        yield Server(f"http://127.0.0.1:{address.port}", HTTPClient(agent), agent, backend)
    finally:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping
        await pool.closeCachedConnections()
        stopped = top.stopService()
        if stopped is not None:
            await stopped


def stack_path(name: str = "dev", project: str = "web") -> str:
    return f"/api/stacks/{ORG}/{project}/{name}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def deployment(resources: list[dict[str, Any]], version: int = 3) -> dict[str, Any]:
    return {
        "version": version,
        "deployment": {
            "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "", "version": ""},
            "resources": resources,
        },
    }


async def create_stack(server: Server, name: str = "dev", project: str = "web") -> str:
    assert await server.ok("POST", f"/api/stacks/{ORG}/{project}", {"stackName": name}) == {}
    return stack_path(name, project)


async def start_update(server: Server, base: str, dry_run: bool = False) -> tuple[str, str]:
    created = await server.ok("POST", f"{base}/update", {"options": {"dryRun": dry_run}})
    update_id: str = created["updateID"]
    started = await server.ok("POST", f"{base}/update/{update_id}", {})
    token: str = started["token"]
    return update_id, token


# -- errors and auth ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_error_is_json(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        message = (await server.call("GET", "/api/nope")).assert_error(404)
        assert "/api/nope" in message
        (await server.call("GET", "/")).assert_error(404)
        (await server.call("DELETE", "/api/user")).assert_error(405)
        (await server.call("PUT", "/api/capabilities")).assert_error(405)
        (await server.call("GET", "/api/user", auth=None)).assert_error(401)
        (await server.call("GET", "/api/user", auth="token wrong-token")).assert_error(401)
        (await server.call("GET", "/api/user", auth=f"Bearer {TOKEN}")).assert_error(401)
        (await server.call("GET", "/api/user", auth="token ")).assert_error(401)
        (await server.call("GET", stack_path(), auth=None)).assert_error(401)
        (await server.call("GET", stack_path())).assert_error(404)
        (await server.call("GET", "/api/stacks/other/web/dev")).assert_error(404)
        (await server.call("POST", f"/api/stacks/{ORG}/web", data=b"{nope")).assert_error(400)
        (await server.call("POST", f"/api/stacks/{ORG}/web", [1])).assert_error(400)
        reply = await server.call(
            "POST", f"/api/stacks/{ORG}/web", data=b"{}", headers={"Content-Encoding": "br"}
        )
        reply.assert_error(400)
        reply = await server.call(
            "POST",
            f"/api/stacks/{ORG}/web",
            data=b"\x1f\x8b junk",
            headers={"Content-Encoding": "gzip"},
        )
        reply.assert_error(400)


def _no_leak(message: str) -> None:
    for forbidden in (
        "Traceback",
        "sqlite",
        "ProgrammingError",
        "closed",
        "/tmp",
        "/work",
        ".py",
        "line ",
    ):
        assert forbidden not in message, message


@pytest_twisted.ensureDeferred
async def test_internal_errors_do_not_leak(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        await create_stack(server)
        server.backend.store.close()
        # A storage failure is a 503: nothing was written and a retry may succeed.
        reply = await server.call("GET", stack_path())
        _no_leak(reply.assert_error(503))

        async def broken(*args: Any) -> None:
            raise RuntimeError("/work/pulumid/secret.py line 1")

        server.backend.stack = broken  # type: ignore[method-assign,assignment]
        reply = await server.call("GET", stack_path())
        _no_leak(reply.assert_error(500))


@pytest.mark.parametrize(
    "path",
    [
        "/api/user/stacks?continuationToken=%C2%B2",
        "/api/user/stacks?project=%ff",
        f"{stack_path()}/export/%C2%B2",
        f"{stack_path()}/updates?page=99999999999999999999",
    ],
    ids=["superscript-token", "bad-utf8", "superscript-version", "huge-page"],
)
@pytest_twisted.ensureDeferred
async def test_bad_client_input_is_not_a_server_error(tmp_path: Path, path: str) -> None:
    async with serve(tmp_path) as server:
        await create_stack(server)
        reply = await server.call("GET", path)
        assert reply.code < 500, reply.body


# -- bodies -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_body_limit(tmp_path: Path) -> None:
    async with serve(tmp_path, max_body_size=2048) as server:
        base = await create_stack(server)
        small = await server.ok("POST", f"{base}/encrypt", {"plaintext": b64(b"x" * 100)})
        assert small["ciphertext"]
        big = {"plaintext": b64(os.urandom(4096))}
        message = (await server.call("POST", f"{base}/encrypt", big)).assert_error(413)
        assert "2048" in message
        # After decompression counts, too.
        bomb = json.dumps({"plaintexts": [b64(b"\0" * 8192)]}).encode()
        reply = await server.call("POST", f"{base}/batch-encrypt", data=bomb, gzipped=True)
        reply.assert_error(413)
        # A chunked body of unknown length is cut off as well.
        producer = FileBodyProducer(BytesIO(json.dumps(big).encode()))
        producer.length = UNKNOWN_LENGTH
        reply = await server.call("POST", f"{base}/encrypt", data=producer)
        reply.assert_error(413)
        # The server is still fine afterwards.
        assert (await server.ok("GET", "/api/user"))["githubLogin"] == USER


@pytest_twisted.ensureDeferred
async def test_gzip_request_bodies(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        encrypted = await server.ok(
            "POST",
            f"{base}/batch-encrypt",
            data=json.dumps({"plaintexts": [b64(b"a")]}).encode(),
            gzipped=True,
        )
        [ciphertext] = encrypted["ciphertexts"]
        decrypted = await server.ok(
            "POST",
            f"{base}/batch-decrypt",
            data=json.dumps({"ciphertexts": [ciphertext]}).encode(),
            gzipped=True,
        )
        assert decrypted == {"plaintexts": {ciphertext: b64(b"a")}}
        document = deployment([{"urn": "urn:pulumi:dev::web::a:b:C::x", "custom": True}])
        text = json.dumps(document).encode()
        imported = await server.ok("POST", f"{base}/import", data=text, gzipped=True)
        assert set(imported) == {"updateId"}
        reply = await server.call("GET", f"{base}/export")
        assert reply.code == 200
        assert reply.body == text


# -- secrets ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_secrets_round_trip(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        other = await create_stack(server, "other")
        single = await server.ok("POST", f"{base}/encrypt", {"plaintext": b64(b"hunter2")})
        assert set(single) == {"ciphertext"}
        plain = await server.ok("POST", f"{base}/decrypt", {"ciphertext": single["ciphertext"]})
        assert plain == {"plaintext": b64(b"hunter2")}
        values = [b"", bytes(range(256)), os.urandom(32), b"\xff\xfe\x00"]
        values += [f"secret-{i}".encode() * (i % 7 + 1) for i in range(296)]
        values[150] = os.urandom(200_000)  # pushes the batch onto the CPU pool
        batch = await server.ok(
            "POST",
            f"{base}/batch-encrypt",
            {"plaintexts": [b64(v) for v in values]},
            gzipped=False,
        )
        ciphertexts = batch["ciphertexts"]
        assert len(ciphertexts) == 300
        assert len(set(ciphertexts)) == 300
        request = [*ciphertexts, ciphertexts[0], ciphertexts[5]]
        decrypted = await server.ok(
            "POST", f"{base}/batch-decrypt", {"ciphertexts": request}, gzipped=False
        )
        plaintexts = decrypted["plaintexts"]
        assert list(plaintexts) == ciphertexts
        assert {k: base64.b64decode(v) for k, v in plaintexts.items()} == dict(
            zip(ciphertexts, values, strict=True)
        )
        # Another stack's key does not open these.
        reply = await server.call("POST", f"{other}/decrypt", {"ciphertext": ciphertexts[1]})
        _no_leak(reply.assert_error(400))
        for body in ({"ciphertext": "not base64!"}, {"ciphertext": 5}, {}):
            (await server.call("POST", f"{base}/decrypt", body)).assert_error(400)
        (await server.call("POST", f"{base}/batch-decrypt", {"ciphertexts": "x"})).assert_error(400)
        reply = await server.call("POST", f"{stack_path('nope')}/encrypt", {"plaintext": ""})
        reply.assert_error(404)
        for route in ("decrypt/log-decryption", "decrypt/log-batch-decryption"):
            assert (await server.call("POST", f"{base}/{route}", {})).code == 204


# -- the update lifecycle -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_update_lifecycle(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        created = await server.ok(
            "POST",
            f"{base}/update",
            {
                "name": "web",
                "runtime": "yaml",
                "options": {"dryRun": False},
                "config": {"web:size": {"string": "3", "secret": False, "object": False}},
                "metadata": {"message": "deploy", "environment": {"exec.kind": "cli"}},
            },
        )
        assert created["requiredPolicies"] == [] and created["updateID"]
        update_id = created["updateID"]
        started = await server.ok(
            "POST", f"{base}/update/{update_id}", {"tags": {"pulumi:project": "web"}}
        )
        assert started["version"] == 1
        token = started["token"]
        assert token and isinstance(started["tokenExpiration"], int)
        stack = await server.ok("GET", base)
        assert stack["activeUpdate"] == update_id
        assert stack["currentOperation"]["kind"] == "update"
        assert stack["currentOperation"]["author"] == USER
        assert stack["tags"] == {"pulumi:project": "web"}
        update_auth = f"update-token {token}"
        inner = (
            '{"manifest":{"time":"2024-01-01T00:00:00Z","magic":"","version":""},'
            '"resources":[{"urn":"urn:pulumi:dev::web::a:b:C::\\u003cx\\u003e","n":1.50}]}'
        )
        checkpoint = f'{{"isInvalid":false,"version":3,"deployment":{inner}}}'.encode()
        reply = await server.call(
            "PATCH",
            f"{base}/update/{update_id}/checkpoint",
            data=checkpoint,
            gzipped=True,
            auth=update_auth,
        )
        assert reply.code == 204, reply.body
        events = [
            {"sequence": 1, "timestamp": 2, "stdoutEvent": {"message": "hi", "color": "raw"}},
            {"sequence": 0, "timestamp": 1, "preludeEvent": {"config": {}}},
            {
                "sequence": 2,
                "timestamp": 3,
                "summaryEvent": {"resourceChanges": {"create": 1}, "result": "succeeded"},
            },
        ]
        reply = await server.call(
            "POST",
            f"{base}/update/{update_id}/events/batch",
            {"events": events},
            gzipped=True,
            auth=update_auth,
        )
        assert reply.code in (200, 204), reply.body
        renewed = await server.ok(
            "POST",
            f"{base}/update/{update_id}/renew_lease",
            {"token": "", "duration": 300},
            auth=update_auth,
        )
        assert renewed["token"] == token
        reply = await server.call(
            "POST", f"{base}/update/{update_id}/complete", {"status": "succeeded"}, auth=update_auth
        )
        assert reply.code == 204, reply.body
        # A retried complete is fine.
        reply = await server.call(
            "POST", f"{base}/update/{update_id}/complete", {"status": "succeeded"}, auth=update_auth
        )
        assert reply.code == 204, reply.body

        history = await server.ok("GET", f"{base}/updates?pageSize=10&page=1")
        [info] = history["updates"]
        assert info["updateID"] == update_id
        assert (info["kind"], info["result"], info["version"]) == ("update", "succeeded", 1)
        assert info["message"] == "deploy"
        assert info["environment"] == {"exec.kind": "cli"}
        assert info["config"] == {"web:size": {"string": "3", "secret": False, "object": False}}
        assert info["resourceChanges"] == {"create": 1}
        assert isinstance(info["startTime"], int) and isinstance(info["endTime"], int)
        latest = await server.ok("GET", f"{base}/updates/latest")
        assert (latest["updateID"], latest["version"]) == (update_id, 1)

        expected = f'{{"version":3,"deployment":{inner}}}'.encode()
        for path in (f"{base}/export", f"{base}/export/1"):
            reply = await server.call("GET", path)
            assert reply.code == 200
            assert reply.header("content-type") == "application/json"
            assert reply.body == expected
        reply = await server.raw_get(f"{base}/export", {"Accept-Encoding": "gzip"})
        assert reply.header("content-encoding") == "gzip"
        assert gzip.decompress(reply.body) == expected
        (await server.call("GET", f"{base}/export/2")).assert_error(404)
        (await server.call("GET", f"{base}/export/0")).assert_error(400)
        (await server.call("GET", f"{base}/export/x")).assert_error(400)

        got = await server.ok("GET", f"{base}/update/{update_id}/events")
        assert got["continuationToken"] is None
        assert got["events"] == [events[1], events[0], events[2]]
        status = await server.ok("GET", f"{base}/update/{update_id}")
        assert status == {"status": "succeeded", "events": [], "continuationToken": None}
        stack = await server.ok("GET", base)
        assert "currentOperation" not in stack
        assert stack["version"] == 1
        listed = await server.ok("GET", "/api/user/stacks")
        [summary] = listed["stacks"]
        assert summary["resourceCount"] == 1
        assert summary["lastUpdate"] > 0


@pytest_twisted.ensureDeferred
async def test_conflicts_tokens_and_cancel(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        update_id, token = await start_update(server, base)
        created = await server.ok("POST", f"{base}/update", {})
        second = created["updateID"]
        reply = await server.call("POST", f"{base}/update/{second}", {})
        assert reply.assert_error(409) == ANOTHER_UPDATE
        # A preview may still run.
        preview, preview_token = await start_update(server, base, dry_run=True)
        reply = await server.call(
            "PATCH",
            f"{base}/update/{preview}/checkpoint",
            data=json.dumps(deployment([])).encode(),
            auth=f"update-token {preview_token}",
        )
        reply.assert_error(403)
        calls: list[tuple[str, str, Any]] = [
            ("PATCH", "checkpoint", deployment([])),
            ("PATCH", "checkpointverbatim", {"untypedDeployment": deployment([])}),
            ("POST", "events/batch", {"events": [{"sequence": 0}]}),
            ("POST", "renew_lease", {"duration": 300}),
            ("POST", "complete", {"status": "succeeded"}),
        ]
        for method, route, body in calls:
            for auth in ("update-token wrong", None, f"token {TOKEN}", f"update-token {TOKEN}"):
                reply = await server.call(
                    method, f"{base}/update/{update_id}/{route}", body, auth=auth
                )
                reply.assert_error(403)
        (await server.call("POST", f"{base}/update/nope/cancel")).assert_error(404)
        stack = await server.ok("GET", base)
        assert stack["activeUpdate"] == update_id
        reply = await server.call("POST", f"{base}/update/{update_id}/cancel", data=b"")
        assert reply.code == 204, reply.body
        (await server.call("POST", f"{base}/update/{update_id}/cancel")).assert_error(409)
        reply = await server.call(
            "POST",
            f"{base}/update/{update_id}/complete",
            {"status": "succeeded"},
            auth=f"update-token {token}",
        )
        reply.assert_error(409)
        started = await server.ok("POST", f"{base}/update/{second}", {})
        assert started["version"] == 2
        (await server.call("POST", f"{base}/update/{second}", {})).assert_error(409)


@pytest_twisted.ensureDeferred
async def test_import_and_poll(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        document = deployment([{"urn": "a"}, {"urn": "b"}])
        imported = await server.ok(
            "POST", f"{base}/import", data=json.dumps(document).encode(), gzipped=True
        )
        status = await server.ok("GET", f"{base}/update/{imported['updateId']}")
        assert status == {"status": "succeeded", "events": [], "continuationToken": None}
        for bad in (deployment([], version=0), deployment([], version=5), {"version": 3}):
            reply = await server.call(
                "POST", f"{base}/import", data=json.dumps(bad).encode(), gzipped=True
            )
            reply.assert_error(400)
        [entry] = (await server.ok("GET", f"{base}/updates"))["updates"]
        assert (entry["kind"], entry["result"], entry["version"]) == ("import", "succeeded", 1)


# -- stacks -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stack_delete_and_project_exists(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        assert (await server.call("HEAD", f"/api/stacks/{ORG}/web")).code == 200
        assert (await server.call("HEAD", f"/api/stacks/{ORG}/nope")).code == 404
        assert (await server.call("HEAD", f"/api/stacks/{ORG}/web", auth=None)).code == 401
        reply = await server.call("POST", f"/api/stacks/{ORG}/web", {"stackName": "dev"})
        assert "already exists" in reply.assert_error(409)
        await server.ok(
            "POST", f"{base}/import", data=json.dumps(deployment([{"urn": "a"}])).encode()
        )
        reply = await server.call("DELETE", base)
        assert reply.assert_error(400) == STACK_HAS_RESOURCES
        reply = await server.call("DELETE", f"{base}?force=true")
        assert reply.code == 204
        (await server.call("GET", base)).assert_error(404)
        assert (await server.call("HEAD", f"/api/stacks/{ORG}/web")).code == 404


@pytest_twisted.ensureDeferred
async def test_rename_keeps_old_path_decryption(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        base = await create_stack(server)
        secret = await server.ok("POST", f"{base}/encrypt", {"plaintext": b64(b"pw")})
        await server.ok("POST", f"{base}/import", data=json.dumps(deployment([])).encode())
        reply = await server.call("POST", f"{base}/rename", {"newName": "prod"})
        assert reply.code == 204, reply.body
        (await server.call("GET", base)).assert_error(404)
        new = stack_path("prod")
        assert (await server.ok("GET", new))["stackName"] == "prod"
        for path in (base, new):
            plain = await server.ok("POST", f"{path}/decrypt", {"ciphertext": secret["ciphertext"]})
            assert plain == {"plaintext": b64(b"pw")}
        (await server.call("POST", f"{new}/rename", {"newName": "prod"})).assert_error(400)
        await create_stack(server, "taken")
        (await server.call("POST", f"{new}/rename", {"newName": "taken"})).assert_error(409)
        reply = await server.call("POST", f"{new}/rename", {"newProject": "site"})
        assert reply.code == 204
        assert (await server.ok("GET", stack_path("prod", "site")))["projectName"] == "site"


@pytest_twisted.ensureDeferred
async def test_tags_and_listing(tmp_path: Path) -> None:
    async with serve(tmp_path, page_size=2) as server:
        for name in ("a", "b", "c"):
            await create_stack(server, name)
        await create_stack(server, "d", project="api")
        reply = await server.call("PATCH", f"{stack_path('a')}/tags", {"team": "x"})
        assert reply.code == 204
        assert (await server.ok("GET", stack_path("a")))["tags"] == {"team": "x"}
        (await server.call("PATCH", f"{stack_path('a')}/tags", {"bad tag": "x"})).assert_error(400)
        names: list[str] = []
        tokens: list[str | None] = []
        query = "/api/user/stacks"
        while True:
            page = await server.ok("GET", query)
            names.extend(s["id"] for s in page["stacks"])
            tokens.append(page.get("continuationToken"))
            if page.get("continuationToken") is None:  # absent on the last page
                break
            query = f"/api/user/stacks?continuationToken={page['continuationToken']}"
        # In (org, project, name) order, as the CLI sorts them.
        assert names == [f"{ORG}/api/d", f"{ORG}/web/a", f"{ORG}/web/b", f"{ORG}/web/c"]
        assert len(tokens) == 2 and tokens[-1] is None
        page = await server.ok("GET", "/api/user/stacks?project=api")
        assert page == {
            "stacks": [
                {"id": f"{ORG}/api/d", "orgName": ORG, "projectName": "api", "stackName": "d"}
            ],
        }
        page = await server.ok("GET", "/api/user/stacks?tagName=team&tagValue=x")
        assert [s["stackName"] for s in page["stacks"]] == ["a"]
        page = await server.ok("GET", "/api/user/stacks?organization=someone-else")
        assert page == {"stacks": []}
        (await server.call("GET", "/api/user/stacks?continuationToken=x")).assert_error(400)


# -- identity -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_identity_and_capabilities(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        user = await server.ok("GET", "/api/user")
        assert user["githubLogin"] == USER
        assert user["name"] == USER
        assert [o["githubLogin"] for o in user["organizations"]] == [ORG]
        default = await server.ok("GET", "/api/user/organizations/default")
        assert default["GitHubLogin"] == ORG
        capabilities = await server.ok("GET", "/api/capabilities")
        by_name = {c["capability"]: c for c in capabilities["capabilities"]}
        assert "batch-encrypt" in by_name
        schema = by_name["deployment-schema-version"]
        assert schema["configuration"]["version"] in (3, 4)
        templates = await server.ok("GET", "/api/registry/templates")
        assert templates == {"templates": []}
