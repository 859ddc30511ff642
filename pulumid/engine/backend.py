"""The domain: stacks, updates and their leases, checkpoints, history, export and import.

Free of HTTP and SQL: it talks to a Store, reads time from an injected clock and sends
blocking work (big JSON, gzip) to the CPU runner.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import secrets as secrets_module
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.auth.tokens import hash_token, new_token, same
from pulumid.config import Config
from pulumid.engine import deployments
from pulumid.engine.events import EventWriter, encode_events, is_packed, unpacked
from pulumid.engine.inflight import InFlight
from pulumid.engine.rename import rename_deployment
from pulumid.engine.secrets import StackSecrets
from pulumid.errors import BadRequest, Forbidden, NotFound, PulumidError, Unavailable
from pulumid.storage.interface import Store
from pulumid.storage.records import (
    RetentionRules,
    StackRecord,
    StackRef,
    StateBlob,
    StoredEvent,
    UpdateRecord,
)
from pulumid.threads import Runner

STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TAG_NAME = re.compile(r"^[a-zA-Z0-9-_.:]{1,40}$")
COMPLETE_STATUSES = ("succeeded", "failed", "cancelled")
EVENTS_PAGE = 100
LEASE_EXPIRED = "the update's lease expired: its CLI stopped renewing it"
DAY = 86400.0
# How long a node's claim on one lease expiry holds off the other nodes.
CLAIM_SECONDS = 60.0
# Event batches of more events or bytes than these are encoded (and compressed) on the CPU
# pool.
INLINE_EVENTS = 50
INLINE_EVENT_BYTES = 64 * 1024


MAX_INT = 2**53


def parse_bounded_int(text: str, what: str) -> int:
    """A non-negative decimal integer from a client, or a 400."""
    if not (text.isascii() and text.isdecimal()) or len(text) > 15:
        raise BadRequest(f"Bad Request: invalid {what}")
    return int(text)


def continuation_token(last: StackRef) -> str:
    """An opaque token for the page after LAST: base64url of ["org", "project", "name"]."""
    text = json.dumps([last.org, last.project, last.name], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def parse_continuation(token: str) -> StackRef:
    """continuation_token's stack back, or a 400 for anything else."""
    try:
        if len(token) > 1024 or not token.isascii():
            raise ValueError
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, str) for k in key)):
            raise ValueError
    except ValueError:
        raise BadRequest("Bad Request: invalid continuation token") from None
    return StackRef(*key)


def validate_ref(ref: StackRef) -> None:
    if not PROJECT_NAME.match(ref.project):
        raise BadRequest(f"Bad Request: invalid project name {ref.project!r}")
    if not STACK_NAME.match(ref.name):
        raise BadRequest(
            f"Bad Request: invalid stack name {ref.name!r}: use 1-100 letters, digits, "
            "'-', '_' or '.'"
        )


def validate_tags(tags: Any) -> dict[str, str]:
    if not isinstance(tags, dict):
        raise BadRequest("Bad Request: tags must be a JSON object of strings")
    for name, value in tags.items():
        if not TAG_NAME.match(name):
            raise BadRequest(f"Bad Request: invalid tag name {name!r}")
        if not isinstance(value, str) or len(value) > 256:
            raise BadRequest(f"Bad Request: tag {name!r} must be a string of at most 256 chars")
    return dict(tags)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def traced(name: str) -> Callable[[F], F]:
    """A span around an engine operation when traces are on (child of the request's)."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def inner(self: Backend, *args: Any, **kwargs: Any) -> Any:
            if self.tracing is None:
                return await method(self, *args, **kwargs)
            with self.tracing.operation(name):
                return await method(self, *args, **kwargs)

        return inner  # type: ignore[return-value]

    return decorate


class Backend:
    log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: IReactorTime,
        cpu: Runner,
        secrets: StackSecrets,
        events: EventWriter,
        inflight: InFlight,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.cpu = cpu
        self.secrets = secrets
        self.events = events
        self.inflight = inflight
        # Names this process in claims of timed work shared with other nodes.
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets_module.token_hex(4)}"
        # The organizations stacks may belong to: the RBAC file's in the multi-user modes.
        self.organizations: Callable[[], list[str]] = lambda: [config.organization, config.user]
        # pulumid.auth.service.Auth, composed in tap.py; the API reads it.
        self.auth: Any = None
        # Set by the tap: the key rotation service, and the backups when a destination is set.
        self.rotation: Any = None
        self.backups: Any = None
        # pulumid.ops.metrics.Metrics, composed in tap.py.
        self.metrics: Any = None
        # pulumid.ops.tracing.Tracing when traces are exported.
        self.tracing: Any = None

    # -- identity -------------------------------------------------------------------------

    @property
    def owners(self) -> list[str]:
        return self.organizations()

    def check_owner(self, org: str) -> None:
        if org not in self.owners:
            raise NotFound(f"Not Found: organization '{org}' not found")

    # -- stacks ---------------------------------------------------------------------------

    async def stack(self, ref: StackRef) -> StackRecord:
        self.check_owner(ref.org)
        stack = await self.store.get_stack(ref)
        if stack is None:
            raise NotFound(f"Not Found: stack '{ref}' not found")
        return stack

    async def create_stack(self, org: str, project: str, body: dict[str, Any]) -> StackRecord:
        name = body.get("stackName")
        if not isinstance(name, str):
            raise BadRequest("Bad Request: 'stackName' is required")
        ref = StackRef(org, project, name)
        self.check_owner(org)
        validate_ref(ref)
        tags = validate_tags(body.get("tags") or {})
        if body.get("teams"):
            raise BadRequest("Bad Request: teams are not supported by this server")
        if body.get("config"):
            raise BadRequest("Bad Request: service-managed stack config is not supported")
        initial = None
        if body.get("state") is not None:
            initial = await self.cpu.run(
                deployments.untyped_state_from_value_blocking, body["state"]
            )
        return await self.store.create_stack(ref, tags, self.clock.seconds(), initial)

    async def list_stacks(
        self,
        org: str | None,
        project: str | None,
        tag_name: str | None,
        tag_value: str | None,
        continuation: str | None,
        readable: list[str] | None = None,
    ) -> tuple[list[StackRecord], str | None]:
        """A page of stacks; READABLE limits the organizations looked in (None: all)."""
        owners = self.owners if readable is None else [o for o in self.owners if o in readable]
        orgs = owners if org is None else [org]
        if org is not None and org not in owners:
            return [], None
        after = parse_continuation(continuation) if continuation else None
        size = self.config.page_size
        stacks = await self.store.list_stacks(orgs, project, tag_name, tag_value, after, size + 1)
        if len(stacks) > size:
            last = stacks[size - 1]
            return stacks[:size], continuation_token(StackRef(last.org, last.project, last.name))
        return stacks, None

    async def project_exists(self, org: str, project: str) -> bool:
        self.check_owner(org)
        return await self.store.project_exists(org, project)

    async def delete_stack(self, ref: StackRef, force: bool) -> None:
        stack = await self.stack(ref)
        await self.store.delete_stack(stack.id, force)
        self.secrets.forget(stack.id)
        if stack.locked_by:
            self.inflight.forget(stack.locked_by)

    async def set_tags(self, ref: StackRef, tags: Any) -> None:
        stack = await self.stack(ref)
        await self.store.set_tags(stack.id, validate_tags(tags))

    @traced("engine.rename_stack")
    async def rename_stack(self, ref: StackRef, new_project: str, new_name: str) -> None:
        stack = await self.stack(ref)
        new_ref = StackRef(ref.org, new_project or ref.project, new_name or ref.name)
        validate_ref(new_ref)
        if new_ref == ref:
            raise BadRequest("Bad Request: the new name is the same as the current one")
        state = await self.store.get_state(stack.id, None)
        new_state = None
        update = None
        if state is not None:
            new_state = await self.cpu.run(self._renamed_state_blocking, state, ref, new_ref)
            update = self._instant_update(stack, "rename", f"Renamed from {ref}")
        await self.store.rename_stack(
            stack.id, new_ref, stack.version, new_state, update, self.config.state_versions
        )

    def _instant_update(self, stack: StackRecord, kind: str, message: str) -> UpdateRecord:
        """A finished update for history, for operations that happen in one request."""
        now = self.clock.seconds()
        return UpdateRecord(
            id=str(uuid.uuid4()),
            stack_id=stack.id,
            kind=kind,
            dry_run=False,
            status="succeeded",
            version=stack.version + 1,
            program={},
            config={},
            metadata={"message": message, "environment": {}},
            created=now,
            start_time=now,
            end_time=now,
            requested_by=self.config.user,
        )

    @staticmethod
    def _renamed_state_blocking(state: StateBlob, old: StackRef, new: StackRef) -> StateBlob:
        document = deployments.parse_state_blocking(state)
        if isinstance(document.get("deployment"), dict):
            document["deployment"] = rename_deployment(
                document["deployment"],
                old_project=old.project,
                old_stack=old.name,
                new_project=new.project,
                new_stack=new.name,
                owner=new.org,
            )
        return deployments.untyped_state_from_value_blocking(document)

    # -- export / import ------------------------------------------------------------------

    @traced("engine.export")
    async def export(self, ref: StackRef, version: int | None) -> StateBlob:
        stack = await self.stack(ref)
        if stack.locked_by and version in (None, stack.version):
            # A running (or crashed) update whose state lives in journal entries or deltas.
            update = await self.store.get_update(stack.locked_by)
            if update is not None and update.status == "running":
                # Progress that cannot be built: what version N holds is the last good.
                current, _failure = await self._built(update, self.inflight.current_state)
                # An update that ended while its progress was read from the store may have
                # had its journal or deltas deleted under the read: what it left is stored.
                if current is not None:
                    if await self._still_running(update.id):
                        return current
                    self.inflight.forget(update.id)  # rebuilt for an update that has ended
        if version is not None:
            if version < 1 or version > stack.version:
                raise NotFound(f"Not Found: stack '{ref}' has no version {version}")
            state = await self.store.get_state(stack.id, version)
            if state is None:
                raise NotFound(f"Not Found: version {version} of stack '{ref}' is no longer kept")
            return state
        state = await self.store.get_state(stack.id, None)
        if state is None:
            return StateBlob(deployments.gzip_blocking(deployments.EMPTY_DEPLOYMENT), 0)
        return state

    async def _still_running(self, update_id: str) -> bool:
        update = await self.store.get_update(update_id)
        return update is not None and update.status == "running"

    @traced("engine.import_state")
    async def import_state(self, ref: StackRef, body: bytes) -> str:
        stack = await self.stack(ref)
        state = await self.cpu.run(deployments.untyped_state_blocking, body)
        await self._end_expired_holder(stack)
        update = self._instant_update(stack, "import", "")
        await self.store.import_state(update, state, self.config.state_versions)
        return update.id

    # -- updates --------------------------------------------------------------------------

    async def _update_of(self, ref: StackRef, update_id: str) -> tuple[StackRecord, UpdateRecord]:
        stack = await self.stack(ref)
        update = await self.store.get_update(update_id)
        if update is None or update.stack_id != stack.id:
            raise NotFound(f"Not Found: update '{update_id}' not found")
        return stack, update

    async def create_update(self, ref: StackRef, kind: str, body: dict[str, Any]) -> str:
        stack = await self.stack(ref)
        options = body.get("options") or {}
        config = body.get("config") or {}
        metadata = body.get("metadata") or {}
        if (
            not isinstance(options, dict)
            or not isinstance(config, dict)
            or not isinstance(metadata, dict)
        ):
            raise BadRequest("Bad Request: 'options', 'config' and 'metadata' must be objects")
        dry_run = bool(options.get("dryRun")) or kind == "preview"
        program = {k: body.get(k, "") for k in ("name", "runtime", "main", "description")}
        update = UpdateRecord(
            id=str(uuid.uuid4()),
            stack_id=stack.id,
            kind=kind,
            dry_run=dry_run,
            status="not-started",
            version=stack.version,
            program=program,
            config=config,
            metadata=metadata,
            created=self.clock.seconds(),
            requested_by=self.config.user,
        )
        await self.store.create_update(update)
        return update.id

    @traced("engine.start_update")
    async def start_update(
        self, ref: StackRef, update_id: str, body: dict[str, Any], engine_version: str = ""
    ) -> UpdateRecord:
        stack, update = await self._update_of(ref, update_id)
        tags = body.get("tags")
        if tags is not None:
            tags = validate_tags(tags)
        requested = body.get("journalVersion")
        journal = 0
        if (
            self.config.journaling
            and not update.dry_run
            and isinstance(requested, int)
            and not isinstance(requested, bool)
            and requested >= 1
        ):
            journal = 1
        if not update.dry_run:
            await self._end_expired_holder(stack)
        now = self.clock.seconds()
        token = new_token()
        started = await self.store.start_update(
            update_id,
            hash_token(token),
            now,
            now + self.config.lease_ttl,
            tags,
            journal,
            engine_version,
        )
        return replace(started, token=token)

    async def _end_expired_holder(self, stack: StackRecord) -> None:
        """An update whose CLI died keeps what it did: end it properly before taking over."""
        if not stack.locked_by:
            return
        holder = await self.store.get_update(stack.locked_by)
        if holder is not None and holder.status == "running":
            if (holder.lease_expires or 0) <= self.clock.seconds():
                await self._expire(holder)

    async def renew_lease(self, ref: StackRef, update_id: str, token: str, duration: Any) -> float:
        await self._update_of(ref, update_id)
        if (
            not isinstance(duration, int | float)
            or isinstance(duration, bool)
            or not (0 <= duration <= 300)
        ):
            raise BadRequest("Bad Request: duration must be between 0 and 300 seconds")
        now = self.clock.seconds()
        # The CLI asks for 300 s; the configured TTL caps it so a dead CLI frees the stack.
        expires = now + min(float(duration) or self.config.lease_ttl, self.config.lease_ttl)
        await self.store.renew_lease(update_id, hash_token(token), now, expires)
        return expires

    async def leased(self, ref: StackRef, update_id: str, token: str) -> UpdateRecord:
        """One read: the update belongs to the stack and the token holds its live lease.

        The API calls it before it reads a request body, and hands the record on (`lease`),
        so that a wrong token costs no decompression or parsing and no second read.
        """
        self.check_owner(ref.org)
        return await self.store.check_lease(update_id, hash_token(token), self.clock.seconds(), ref)

    @traced("engine.checkpoint")
    async def checkpoint(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        body: bytes,
        lease: UpdateRecord | None = None,
    ) -> None:
        # Validate the lease before the expensive parse.
        update = lease or await self.leased(ref, update_id, token)
        await self.inflight.save_full(update, hash_token(token), body)

    @traced("engine.checkpoint_verbatim")
    async def checkpoint_verbatim(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        body: bytes,
        lease: UpdateRecord | None = None,
    ) -> None:
        update = lease or await self.leased(ref, update_id, token)
        await self.inflight.save_verbatim(update, hash_token(token), body)

    @traced("engine.checkpoint_delta")
    async def checkpoint_delta(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        wire: bytes,
        body: bytes,
        lease: UpdateRecord | None = None,
    ) -> None:
        update = lease or await self.leased(ref, update_id, token)
        await self.inflight.save_delta(update, hash_token(token), wire, body)

    @traced("engine.journal_entries")
    async def journal_entries(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        wire: bytes,
        body: bytes,
        lease: UpdateRecord | None = None,
    ) -> None:
        update = lease or await self.leased(ref, update_id, token)
        if not update.journal_version:
            raise BadRequest("Bad Request: journaling was not enabled for this update")
        await self.inflight.add_journal(update, hash_token(token), wire, body)

    @traced("engine.post_events")
    async def post_events(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        body: Any,
        lease: UpdateRecord | None = None,
        size: int = 0,
    ) -> None:
        """Store a batch of events; SIZE is the request body's length, if known."""
        if lease is None:
            await self.leased(ref, update_id, token)
        events = body.get("events") if isinstance(body, dict) else None
        if isinstance(events, list) and (len(events) > INLINE_EVENTS or size > INLINE_EVENT_BYTES):
            stored, summary = await self.cpu.run(encode_events, events)
        else:
            stored, summary = encode_events(events)
        # Stored before the answer: nothing acknowledged is lost in a crash.
        await self.events.add(update_id, stored, summary)

    async def completing(self, ref: StackRef, update_id: str, token: str) -> UpdateRecord:
        """The update `token` may complete (running, or ended: a retried complete)."""
        _stack, update = await self._update_of(ref, update_id)
        if not same(update.token_hash or "", hash_token(token)):
            raise Forbidden("Forbidden: the update token is not valid for this update")
        return update

    @traced("engine.complete")
    async def complete(
        self,
        ref: StackRef,
        update_id: str,
        token: str,
        status: Any,
        update: UpdateRecord | None = None,
    ) -> None:
        update = update or await self.completing(ref, update_id, token)
        if status not in COMPLETE_STATUSES:
            raise BadRequest(f"Bad Request: unknown update status {status!r}")
        token_hash = hash_token(token)
        state, failure = None, None
        if update.status == "running":
            state, failure = await self._final_state(update)
        await self.store.complete_update(
            update_id,
            token_hash,
            self.clock.seconds(),
            status,
            self.config.state_versions,
            state,
            failure,
        )
        if failure:
            raise BadRequest(
                f"Bad Request: {failure}; the update was ended as failed and the stack "
                "keeps its last good state"
            )

    @traced("engine.cancel")
    async def cancel(self, ref: StackRef, update_id: str) -> None:
        _stack, update = await self._update_of(ref, update_id)
        state, failure = None, None
        if update.status == "running":
            state, failure = await self._final_state(update)
        await self.store.cancel_update(
            update_id, self.clock.seconds(), state, self.config.state_versions, failure
        )

    async def _final_state(self, update: UpdateRecord) -> tuple[StateBlob | None, str | None]:
        """The state an ending update leaves, or (None, why) when it cannot be built.

        A state that cannot be built must not keep the stack locked: the update ends failed
        and version N keeps what it had (the state at start, or the last full checkpoint).
        """
        return await self._built(update, self.inflight.finish)

    async def _built(
        self, update: UpdateRecord, build: Callable[[UpdateRecord], Awaitable[StateBlob | None]]
    ) -> tuple[StateBlob | None, str | None]:
        """(state, None), or (None, why) when the update's state cannot be built.

        Storage failures are not that: they propagate, and the caller tries again later.
        """
        try:
            return await build(update), None
        except Unavailable:
            raise
        except Exception as e:
            reason = f"the update's state could not be built: {_reason(e)}"
            self.log.error("update {update_id}: {reason}", update_id=update.id, reason=reason)
            return None, reason

    @traced("engine.expire")
    async def _expire(self, update: UpdateRecord) -> bool:
        state, failure = await self._final_state(update)
        expired = await self.store.expire_update(
            update.id,
            self.clock.seconds(),
            state,
            self.config.state_versions,
            f"{LEASE_EXPIRED}; {failure}" if failure else LEASE_EXPIRED,
        )
        if expired:
            self.log.info("lease of update {update_id} expired", update_id=update.id)
        return expired

    async def expire_leases(self) -> list[str]:
        """End every update whose lease ran out; one that fails does not stop the others."""
        expired = []
        now = self.clock.seconds()
        for update in await self.store.list_expired(now):
            try:
                # Every node sweeps; one claims each update, so its final state is built once.
                claimed = await self.store.claim(
                    f"expire:{update.id}", self.node, now, now + CLAIM_SECONDS
                )
                if claimed and await self._expire(update):
                    expired.append(update.id)
            except Exception as e:
                self.log.error(
                    "could not expire update {update_id}: {error}",
                    update_id=update.id,
                    error=_reason(e),
                )
        return expired

    async def apply_retention(self) -> dict[str, int]:
        """Delete ended updates, previews and events past their retention (config, in days)."""
        now = self.clock.seconds()

        def cutoff(days: float) -> float | None:
            return now - days * DAY if days > 0 else None

        rules = RetentionRules(
            events_before=cutoff(self.config.event_retention_days),
            previews_before=cutoff(self.config.preview_retention_days),
            updates_before=cutoff(self.config.update_retention_days),
            unstarted_before=now - DAY,
            claims_before=now - DAY,
            # Expired tokens stay a day, so "expired" (not "unknown") is what a late user sees.
            tokens_expired_before=now - DAY,
            audit_before=cutoff(self.config.auth.audit_retention_days),
        )
        # One node per interval prunes; the others find the claim live and skip.
        interval = self.config.retention_interval
        if not await self.store.claim("retention", self.node, now, now + interval * 0.9):
            return {}
        counts = await self.store.prune(rules)
        if any(counts.values()):
            self.log.info("retention removed {counts}", counts=counts)
        return counts

    async def update_status(self, ref: StackRef, update_id: str) -> UpdateRecord:
        _stack, update = await self._update_of(ref, update_id)
        return update

    async def get_events(
        self, ref: StackRef, update_id: str, continuation: str | None
    ) -> tuple[list[StoredEvent], str | None]:
        _stack, update = await self._update_of(ref, update_id)
        after = -1
        if continuation:
            after = parse_bounded_int(continuation, "continuation token")
        events = await self.store.get_events(update_id, after, EVENTS_PAGE)
        if any(is_packed(e) for e in events):
            # What a gzipped event inflates to is unknown until it is inflated.
            events = await self.cpu.run(unpacked, events)
        last = events[-1].sequence if events else after
        finished = update.status not in ("running", "not-started")
        if finished and len(events) < EVENTS_PAGE:
            return events, None
        return events, str(last)

    async def history(self, ref: StackRef, page: int, page_size: int) -> list[UpdateRecord]:
        """Newest first, previews included; page 0 is every entry (Pulumi Cloud's API)."""
        stack = await self.stack(ref)
        if not (0 <= page <= MAX_INT and 1 <= page_size <= MAX_INT):
            raise BadRequest("Bad Request: page must be 0 (all) or more, and pageSize 1 or more")
        return await self.store.list_history(stack.id, page, min(page_size, 1000))

    async def latest(self, ref: StackRef) -> UpdateRecord:
        stack = await self.stack(ref)
        updates = await self.store.list_history(stack.id, 1, 1, previews=False)
        if not updates:
            raise NotFound(f"Not Found: stack '{ref}' has no updates")
        return updates[0]

    async def update_by_version(self, ref: StackRef, version: int) -> UpdateRecord:
        stack = await self.stack(ref)
        update = await self.store.get_update_by_version(stack.id, version)
        if update is None:
            raise NotFound(f"Not Found: stack '{ref}' has no update with version {version}")
        return update

    # -- secrets --------------------------------------------------------------------------

    async def _secrets_stack(self, ref: StackRef) -> StackRecord:
        self.check_owner(ref.org)
        stack = await self.store.get_stack_or_alias(ref)
        if stack is None:
            raise NotFound(f"Not Found: stack '{ref}' not found")
        return stack

    @traced("engine.encrypt")
    async def encrypt(self, ref: StackRef, plaintexts: list[bytes]) -> list[bytes]:
        stack = await self._secrets_stack(ref)
        return await self.secrets.encrypt(stack.id, plaintexts)

    @traced("engine.decrypt")
    async def decrypt(self, ref: StackRef, ciphertexts: list[bytes]) -> list[bytes]:
        stack = await self._secrets_stack(ref)
        return await self.secrets.decrypt(stack.id, ciphertexts)


def _reason(error: BaseException) -> str:
    """A short, safe description of an error for logs and the update's record."""
    if isinstance(error, PulumidError):
        return error.message
    return f"{type(error).__name__}: {error}"[:500]
