"""The Pulumi Cloud HTTP API, as the pulumi CLI's httpstate backend speaks it."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from pulumid.api.http import (
    INLINE_LIMIT,
    error_response,
    json_response,
    no_content,
    raw_json_response,
    read_body,
    read_json,
    read_object,
    read_wire,
)
from pulumid.engine import deployments
from pulumid.engine.backend import Backend, parse_bounded_int
from pulumid.errors import BadRequest, Forbidden, NotFound, Unauthorized
from pulumid.storage.records import StackRecord, StackRef, UpdateRecord

T = TypeVar("T")

BASE = "/api/stacks/<org>/<project>/<stack>"
KIND = "<any(update,preview,refresh,destroy):kind>"
UPDATE = f"{BASE}/{KIND}/<update_id>"

_STATUS = {
    "not-started": "not started",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "failed",
}


def _b64decode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("Bad Request: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Bad Request: invalid base64 value") from None


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _b64decode_all(values: list[str]) -> list[bytes]:
    return [_b64decode(v) for v in values]


def _encrypted_body(ciphertexts: list[bytes]) -> bytes:
    return orjson.dumps({"ciphertexts": [_b64(c) for c in ciphertexts]})


def _decrypted_body(keys: list[str], plaintexts: list[bytes]) -> bytes:
    # Keys are the ciphertext strings exactly as the CLI sent them.
    return orjson.dumps(
        {"plaintexts": {key: _b64(p) for key, p in zip(keys, plaintexts, strict=True)}}
    )


class API:
    app = Klein()

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.config
        self.cpu = backend.cpu
        self._token = backend.config.token.encode()
        self.capability_list: list[dict[str, Any]] = [
            {"capability": "batch-encrypt", "version": 1},
            {
                "capability": "deployment-schema-version",
                "version": 1,
                "configuration": {"version": 4},
            },
        ]
        if self.config.delta_checkpoints:
            self.capability_list.append(
                {
                    "capability": "delta-checkpoint-uploads-v2",
                    "version": 2,
                    "configuration": {"checkpointCutoffSizeBytes": self.config.delta_cutoff},
                }
            )

    def resource(self) -> IResource:
        return self.app.resource()

    # -- errors ---------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    # -- auth -----------------------------------------------------------------------------

    def _authorization(self, request: IRequest, scheme: str) -> str:
        header = request.getHeader("authorization") or ""
        given_scheme, _, value = header.partition(" ")
        if given_scheme.lower() != scheme or not value.strip():
            if scheme == "update-token":
                raise Unauthorized("Unauthorized: an update token is required")
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")
        return value.strip()

    def _user(self, request: IRequest) -> None:
        token = self._authorization(request, "token")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")

    def _update_token(self, request: IRequest) -> str:
        try:
            return self._authorization(request, "update-token")
        except Unauthorized:
            raise Forbidden("Forbidden: an update token is required") from None

    async def _body(self, request: IRequest) -> dict[str, Any]:
        return await read_object(request, self.cpu, self.config.max_body_size)

    # -- identity and service -------------------------------------------------------------

    @app.route("/api/user", methods=["GET"])
    def user(self, request: IRequest) -> bytes:
        self._user(request)
        org, user = self.config.organization, self.config.user
        return json_response(
            request,
            {
                "id": user,
                "githubLogin": user,
                "name": user,
                "email": "",
                "avatarUrl": "",
                "organizations": [{"githubLogin": org, "name": org, "avatarUrl": ""}],
                "identities": [],
                "siteAdmin": False,
            },
        )

    @app.route("/api/user/organizations/default", methods=["GET"])
    def default_org(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"GitHubLogin": self.config.organization, "Messages": []})

    @app.route("/api/capabilities", methods=["GET"])
    def capabilities(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"capabilities": self.capability_list})

    @app.route("/api/registry/templates", methods=["GET"])
    def templates(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"templates": [], "continuationToken": None})

    @app.route("/api/registry/packages", methods=["GET"])
    def packages(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"packages": [], "continuationToken": None})

    # -- stacks ---------------------------------------------------------------------------

    @app.route("/api/user/stacks", methods=["GET"])
    async def list_stacks(self, request: IRequest) -> bytes:
        self._user(request)
        args = _query(request)
        stacks, token = await self.backend.list_stacks(
            args.get("organization"),
            args.get("project"),
            args.get("tagName"),
            args.get("tagValue"),
            args.get("continuationToken"),
        )
        return json_response(
            request,
            {
                "stacks": [self._summary(s) for s in stacks],
                "continuationToken": token,
            },
        )

    def _summary(self, stack: StackRecord) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "id": f"{stack.org}/{stack.project}/{stack.name}",
            "orgName": stack.org,
            "projectName": stack.project,
            "stackName": stack.name,
        }
        if stack.locked_by:
            summary["lastUpdate"] = 0  # rendered by the CLI as "in progress"
        elif stack.last_update_time:
            summary["lastUpdate"] = stack.last_update_time
        if stack.resource_count is not None:
            summary["resourceCount"] = stack.resource_count
        return summary

    @app.route("/api/stacks/<org>/<project>", methods=["HEAD"])
    async def project_exists(self, request: IRequest, org: str, project: str) -> bytes:
        self._user(request)
        if not await self.backend.project_exists(org, project):
            raise NotFound(f"Not Found: project '{org}/{project}' not found")
        return b""

    @app.route("/api/stacks/<org>/<project>", methods=["POST"])
    async def create_stack(self, request: IRequest, org: str, project: str) -> bytes:
        self._user(request)
        await self.backend.create_stack(org, project, await self._body(request))
        return json_response(request, {})

    @app.route(BASE, methods=["GET"])
    async def get_stack(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        record = await self.backend.stack(StackRef(org, project, stack))
        view: dict[str, Any] = {
            "id": f"{record.org}/{record.project}/{record.name}",
            "orgName": record.org,
            "projectName": record.project,
            "stackName": record.name,
            "activeUpdate": record.locked_by or record.last_update or "",
            "tags": record.tags,
            "version": record.version,
        }
        if record.locked_by:
            update = await self.backend.store.get_update(record.locked_by)
            if update is not None:
                view["currentOperation"] = {
                    "kind": update.kind,
                    "author": update.requested_by,
                    "started": int(update.start_time or update.created),
                }
        return json_response(request, view)

    @app.route(BASE, methods=["DELETE"])
    async def delete_stack(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        force = _query(request).get("force", "false").lower() == "true"
        await self.backend.delete_stack(StackRef(org, project, stack), force)
        return no_content(request)

    @app.route(f"{BASE}/rename", methods=["POST"])
    async def rename(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        body = await self._body(request)
        new_name, new_project = body.get("newName") or "", body.get("newProject") or ""
        if not isinstance(new_name, str) or not isinstance(new_project, str):
            raise BadRequest("Bad Request: 'newName' and 'newProject' must be strings")
        await self.backend.rename_stack(StackRef(org, project, stack), new_project, new_name)
        return no_content(request)

    @app.route(f"{BASE}/tags", methods=["PATCH"])
    async def tags(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        await self.backend.set_tags(StackRef(org, project, stack), await self._body(request))
        return no_content(request)

    # -- export / import / history --------------------------------------------------------

    @app.route(f"{BASE}/export", methods=["GET"])
    async def export(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        return await self._export(request, StackRef(org, project, stack), None)

    @app.route(f"{BASE}/export/<version>", methods=["GET"])
    async def export_version(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        return await self._export(request, StackRef(org, project, stack), _version(version))

    async def _export(self, request: IRequest, ref: StackRef, version: int | None) -> bytes:
        self._user(request)
        state = await self.backend.export(ref, version)
        request.setHeader(b"content-type", b"application/json")
        if b"gzip" in (request.getHeader(b"accept-encoding") or b""):
            request.setHeader(b"content-encoding", b"gzip")
            return state.gzipped
        return await self.cpu.run(deployments.gunzip_blocking, state.gzipped, 1 << 34)

    @app.route(f"{BASE}/import", methods=["POST"])
    async def import_(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        body = await read_body(request, self.cpu, self.config.max_body_size)
        update_id = await self.backend.import_state(StackRef(org, project, stack), body)
        return json_response(request, {"updateId": update_id})

    @app.route(f"{BASE}/updates", methods=["GET"])
    async def history(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        args = _query(request)
        # Pulumi Cloud: page 0 (or none) is every entry; pageSize counts only with a page.
        page, size = _int(args.get("page", "0")), _int(args.get("pageSize", "10"))
        updates = await self.backend.history(StackRef(org, project, stack), page, size)
        return json_response(request, {"updates": [self._info(u) for u in updates]})

    @app.route(f"{BASE}/updates/latest", methods=["GET"])
    async def latest(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        ref = StackRef(org, project, stack)
        update = await self.backend.latest(ref)
        return json_response(request, await self._update_info(ref, update))

    @app.route(f"{BASE}/updates/<version>", methods=["GET"])
    async def update_by_version(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        self._user(request)
        ref = StackRef(org, project, stack)
        update = await self.backend.update_by_version(ref, _version(version))
        return json_response(request, await self._update_info(ref, update))

    @app.route(f"{BASE}/updates/<version>/summary", methods=["GET"])
    async def update_summary(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        self._user(request)
        ref = StackRef(org, project, stack)
        update = await self.backend.update_by_version(ref, _version(version))
        info = self._info(update)
        summary = {
            "result": info["result"],
            "startTime": info["startTime"],
            "endTime": info.get("endTime", 0),
            "resourceCount": info.get("resourceCount", 0),
        }
        return json_response(request, summary)

    async def _update_info(self, ref: StackRef, update: UpdateRecord) -> dict[str, Any]:
        """Pulumi Cloud's UpdateInfo: the history entry and who asked for it."""
        stack = await self.backend.stack(ref)
        user = update.requested_by or self.config.user
        return {
            "info": self._info(update),
            "updateID": update.id,
            "version": update.version,
            "latestVersion": stack.version,
            "requestedBy": {"name": user, "githubLogin": user, "avatarUrl": ""},
        }

    @staticmethod
    def _info(update: UpdateRecord) -> dict[str, Any]:
        result = _STATUS[update.status]
        if result == "running":
            result = "in-progress"
        info: dict[str, Any] = {
            "updateID": update.id,
            "kind": "preview" if update.dry_run else update.kind,
            "startTime": int(update.start_time or update.created),
            "message": str(update.metadata.get("message") or ""),
            "environment": update.metadata.get("environment") or {},
            "config": update.config,
            "result": result,
            "version": update.version,
            "resourceChanges": update.resource_changes or {},
        }
        if update.end_time:
            info["endTime"] = int(update.end_time)
        if update.failure:
            info["failure"] = update.failure  # why the server ended it (not a CLI field)
        return info

    # -- secrets --------------------------------------------------------------------------

    @app.route(f"{BASE}/encrypt", methods=["POST"])
    async def encrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        body = await self._body(request)
        [ciphertext] = await self.backend.encrypt(
            StackRef(org, project, stack), [_b64decode(body.get("plaintext"))]
        )
        return json_response(request, {"ciphertext": _b64(ciphertext)})

    @app.route(f"{BASE}/decrypt", methods=["POST"])
    async def decrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        body = await self._body(request)
        [plaintext] = await self.backend.decrypt(
            StackRef(org, project, stack), [_b64decode(body.get("ciphertext"))]
        )
        return json_response(request, {"plaintext": _b64(plaintext)})

    @app.route(f"{BASE}/batch-encrypt", methods=["POST"])
    async def batch_encrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        values = _string_list(await self._body(request), "plaintexts")
        size = sum(len(v) for v in values)
        plaintexts = await self._offload(size, _b64decode_all, values)
        ciphertexts = await self.backend.encrypt(StackRef(org, project, stack), plaintexts)
        body = await self._offload(size, _encrypted_body, ciphertexts)
        return raw_json_response(request, body)

    @app.route(f"{BASE}/batch-decrypt", methods=["POST"])
    async def batch_decrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        values = list(dict.fromkeys(_string_list(await self._body(request), "ciphertexts")))
        size = sum(len(v) for v in values)
        ciphertexts = await self._offload(size, _b64decode_all, values)
        plaintexts = await self.backend.decrypt(StackRef(org, project, stack), ciphertexts)
        body = await self._offload(size, _decrypted_body, values, plaintexts)
        return raw_json_response(request, body)

    async def _offload(self, size: int, f: Callable[..., T], *args: Any) -> T:
        """Work proportional to a batch runs on the CPU pool unless the batch is small."""
        if size < INLINE_LIMIT:
            return f(*args)
        return await self.cpu.run(f, *args)

    @app.route(f"{BASE}/decrypt/log-decryption", methods=["POST"])
    @app.route(f"{BASE}/decrypt/log-batch-decryption", methods=["POST"])
    def log_decryption(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        self._user(request)
        return no_content(request)

    # -- the update lifecycle -------------------------------------------------------------

    @app.route(f"{BASE}/{KIND}", methods=["POST"])
    async def create_update(
        self, request: IRequest, org: str, project: str, stack: str, kind: str
    ) -> bytes:
        self._user(request)
        update_id = await self.backend.create_update(
            StackRef(org, project, stack), kind, await self._body(request)
        )
        return json_response(
            request, {"updateID": update_id, "requiredPolicies": [], "messages": []}
        )

    @app.route(UPDATE, methods=["POST"])
    async def start_update(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        self._user(request)
        update = await self.backend.start_update(
            StackRef(org, project, stack),
            update_id,
            await self._body(request),
            _engine_version(request),
        )
        response: dict[str, Any] = {
            "version": update.version,
            "token": update.token,
            "tokenExpiration": int(update.lease_expires or 0),
        }
        if update.journal_version:
            response["journalVersion"] = update.journal_version
        return json_response(request, response)

    @app.route(UPDATE, methods=["GET"])
    async def update_status(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        self._user(request)
        update = await self.backend.update_status(StackRef(org, project, stack), update_id)
        running = update.status in ("running", "not-started")
        view: dict[str, Any] = {
            "status": _STATUS[update.status],
            "events": [],
            "continuationToken": "0" if running else None,
        }
        if update.failure:
            view["failure"] = update.failure
        return json_response(request, view)

    @app.route(f"{UPDATE}/renew_lease", methods=["POST"])
    async def renew_lease(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        await self.backend.leased(ref, update_id, token)
        body = await self._body(request)
        expires = await self.backend.renew_lease(ref, update_id, token, body.get("duration", 300))
        return json_response(request, {"token": token, "tokenExpiration": int(expires)})

    # Update-token routes check the token (and the lease) before they read the body: a
    # wrong or stale token costs no decompression and no parsing.

    @app.route(f"{UPDATE}/checkpoint", methods=["PATCH"])
    async def checkpoint(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        body = await read_body(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint(ref, update_id, token, body, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/checkpointverbatim", methods=["PATCH"])
    async def checkpoint_verbatim(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        body = await read_body(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint_verbatim(ref, update_id, token, body, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/checkpointdelta", methods=["PATCH"])
    async def checkpoint_delta(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        wire, body = await read_wire(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint_delta(ref, update_id, token, wire, body, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/journalentries", methods=["PATCH"])
    async def journal_entries(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        wire, body = await read_wire(request, self.cpu, self.config.max_body_size)
        await self.backend.journal_entries(ref, update_id, token, wire, body, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/events/batch", methods=["POST"])
    async def post_events(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        body = await read_json(request, self.cpu, self.config.max_body_size)
        await self.backend.post_events(ref, update_id, token, body, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/events", methods=["POST"])
    async def post_event(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        lease = await self.backend.leased(ref, update_id, token)
        body = await read_json(request, self.cpu, self.config.max_body_size)
        await self.backend.post_events(ref, update_id, token, {"events": [body]}, lease)
        return no_content(request)

    @app.route(f"{UPDATE}/events", methods=["GET"])
    async def get_events(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        self._user(request)
        events, token = await self.backend.get_events(
            StackRef(org, project, stack), update_id, _query(request).get("continuationToken")
        )
        urn = _query(request).get("urn")
        datas = [e.data for e in events]
        if urn:
            datas = [d for d in datas if urn.encode() in d]
        token_json = b"null" if token is None else b'"' + token.encode() + b'"'
        return raw_json_response(
            request,
            b'{"events":[' + b",".join(datas) + b'],"continuationToken":' + token_json + b"}",
        )

    @app.route(f"{UPDATE}/complete", methods=["POST"])
    async def complete(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        update = await self.backend.completing(ref, update_id, token)
        body = await self._body(request)
        await self.backend.complete(ref, update_id, token, body.get("status"), update)
        return no_content(request)

    @app.route(f"{UPDATE}/cancel", methods=["POST"])
    async def cancel(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        self._user(request)
        await self.backend.cancel(StackRef(org, project, stack), update_id)
        return no_content(request)

    # Unknown routes: werkzeug's NotFound reaches _errors and becomes a JSON 404.


_USER_AGENT = re.compile(r"^pulumi-cli/\d+ \(v?(\d+\.\d+\.\d+[^;)]*)")


def _engine_version(request: IRequest) -> str:
    """The CLI's version (from its User-Agent), as its engine writes it into manifests."""
    match = _USER_AGENT.match((request.getHeader("user-agent") or "").strip())
    return f"v{match.group(1)}" if match else ""


def _query(request: IRequest) -> dict[str, str]:
    try:
        return {
            key.decode(): values[-1].decode()
            for key, values in (request.args or {}).items()
            if values
        }
    except UnicodeDecodeError:
        raise BadRequest("Bad Request: the query string is not valid UTF-8") from None


def _int(value: str) -> int:
    return parse_bounded_int(value, f"integer {value!r}")


def _version(value: str) -> int:
    number = parse_bounded_int(value, "version")
    if number < 1:
        raise BadRequest("Bad Request: the version must be a positive integer")
    return number


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    values = body.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"Bad Request: '{key}' must be a list of base64 strings")
    return values
