"""The domain: stacks, updates and their leases, checkpoints, history, export and import.

Free of HTTP and SQL: it talks to a Store, reads time from an injected clock and sends
blocking work (big JSON, gzip) to the CPU runner.
"""

from __future__ import annotations

import re
import secrets as pysecrets
import uuid
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.config import Config
from pulumid.engine import deployments
from pulumid.engine.events import EventBuffer
from pulumid.engine.inflight import InFlight
from pulumid.engine.rename import rename_deployment
from pulumid.engine.secrets import StackSecrets
from pulumid.errors import BadRequest, Forbidden, NotFound
from pulumid.storage.interface import Store
from pulumid.storage.records import StackRecord, StackRef, StateBlob, StoredEvent, UpdateRecord
from pulumid.threads import Runner

STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TAG_NAME = re.compile(r"^[a-zA-Z0-9-_.:]{1,40}$")
COMPLETE_STATUSES = ("succeeded", "failed", "cancelled")
EVENTS_PAGE = 100


MAX_INT = 2**53


def parse_bounded_int(text: str, what: str) -> int:
    """A non-negative decimal integer from a client, or a 400."""
    if not (text.isascii() and text.isdecimal()) or len(text) > 15:
        raise BadRequest(f"Bad Request: invalid {what}")
    return int(text)


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


class Backend:
    log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: IReactorTime,
        cpu: Runner,
        secrets: StackSecrets,
        events: EventBuffer,
        inflight: InFlight,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.cpu = cpu
        self.secrets = secrets
        self.events = events
        self.inflight = inflight

    # -- identity -------------------------------------------------------------------------

    @property
    def owners(self) -> list[str]:
        return [self.config.organization, self.config.user]

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
    ) -> tuple[list[StackRecord], str | None]:
        orgs = self.owners if org is None else [org]
        if org is not None and org not in self.owners:
            return [], None
        after = 0
        if continuation:
            after = parse_bounded_int(continuation, "continuation token")
        size = self.config.page_size
        stacks = await self.store.list_stacks(orgs, project, tag_name, tag_value, after, size + 1)
        if len(stacks) > size:
            return stacks[:size], str(stacks[size - 1].id)
        return stacks, None

    async def project_exists(self, org: str, project: str) -> bool:
        self.check_owner(org)
        return await self.store.project_exists(org, project)

    async def delete_stack(self, ref: StackRef, force: bool) -> None:
        stack = await self.stack(ref)
        await self.store.delete_stack(stack.id, force)
        self.secrets.forget(stack.id)

    async def set_tags(self, ref: StackRef, tags: Any) -> None:
        stack = await self.stack(ref)
        await self.store.set_tags(stack.id, validate_tags(tags))

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

    async def export(self, ref: StackRef, version: int | None) -> StateBlob:
        stack = await self.stack(ref)
        if stack.locked_by and version in (None, stack.version):
            # A running (or crashed) update whose state lives in journal entries or deltas.
            update = await self.store.get_update(stack.locked_by)
            if update is not None and update.status == "running":
                current = await self.inflight.current_state(update)
                if current is not None:
                    return current
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

    async def import_state(self, ref: StackRef, body: bytes) -> str:
        stack = await self.stack(ref)
        state = await self.cpu.run(deployments.untyped_state_blocking, body)
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
        if stack.locked_by and not update.dry_run:
            # An update whose CLI died keeps what it did: end it properly before taking over.
            holder = await self.store.get_update(stack.locked_by)
            if holder is not None and holder.status == "running":
                if (holder.lease_expires or 0) <= self.clock.seconds():
                    await self._expire(holder)
        now = self.clock.seconds()
        return await self.store.start_update(
            update_id,
            pysecrets.token_urlsafe(32),
            now,
            now + self.config.lease_ttl,
            tags,
            journal,
            engine_version,
        )

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
        await self.store.renew_lease(update_id, token, now, expires)
        return expires

    async def _leased(self, ref: StackRef, update_id: str, token: str) -> UpdateRecord:
        """One read: the update belongs to the stack and the token holds its live lease."""
        self.check_owner(ref.org)
        return await self.store.check_lease(update_id, token, self.clock.seconds(), ref)

    async def checkpoint(self, ref: StackRef, update_id: str, token: str, body: bytes) -> None:
        # Validate the lease before the expensive parse.
        await self._leased(ref, update_id, token)
        state = await self.cpu.run(deployments.checkpoint_state_blocking, body)
        await self.store.save_checkpoint(update_id, token, self.clock.seconds(), state)
        self.inflight.forget(update_id)

    async def checkpoint_verbatim(
        self, ref: StackRef, update_id: str, token: str, body: bytes
    ) -> None:
        update = await self._leased(ref, update_id, token)
        await self.inflight.save_verbatim(update, token, body)

    async def checkpoint_delta(
        self, ref: StackRef, update_id: str, token: str, wire: bytes, body: bytes
    ) -> None:
        update = await self._leased(ref, update_id, token)
        await self.inflight.save_delta(update, token, wire, body)

    async def journal_entries(
        self, ref: StackRef, update_id: str, token: str, wire: bytes, body: bytes
    ) -> None:
        update = await self._leased(ref, update_id, token)
        if not update.journal_version:
            raise BadRequest("Bad Request: journaling was not enabled for this update")
        await self.inflight.add_journal(update, token, wire, body)

    async def post_events(self, ref: StackRef, update_id: str, token: str, body: Any) -> None:
        await self._leased(ref, update_id, token)
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            raise BadRequest("Bad Request: No events provided.")
        for event in events:
            if not isinstance(event, dict) or not isinstance(event.get("sequence"), int):
                raise BadRequest("Bad Request: every event needs an integer 'sequence'")
        await self.events.add(update_id, events)

    async def complete(self, ref: StackRef, update_id: str, token: str, status: Any) -> None:
        _stack, update = await self._update_of(ref, update_id)
        if status not in COMPLETE_STATUSES:
            raise BadRequest(f"Bad Request: unknown update status {status!r}")
        if update.token != token:
            raise Forbidden("Forbidden: the update token is not valid for this update")
        # Events are durable before the update is marked finished.
        await self.events.flush()
        state = None
        if update.status == "running":
            state = await self.inflight.finish(update)
        await self.store.complete_update(
            update_id, token, self.clock.seconds(), status, self.config.state_versions, state
        )

    async def cancel(self, ref: StackRef, update_id: str) -> None:
        _stack, update = await self._update_of(ref, update_id)
        await self.events.flush()
        state = None
        if update.status == "running":
            state = await self.inflight.finish(update)
        await self.store.cancel_update(
            update_id, self.clock.seconds(), state, self.config.state_versions
        )

    async def _expire(self, update: UpdateRecord) -> bool:
        state = await self.inflight.finish(update)
        expired = await self.store.expire_update(
            update.id, self.clock.seconds(), state, self.config.state_versions
        )
        if expired:
            self.log.info("lease of update {update_id} expired", update_id=update.id)
        return expired

    async def expire_leases(self) -> list[str]:
        expired = []
        for update in await self.store.list_expired(self.clock.seconds()):
            if await self._expire(update):
                expired.append(update.id)
        return expired

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
        await self.events.flush()
        events = await self.store.get_events(update_id, after, EVENTS_PAGE)
        last = events[-1].sequence if events else after
        finished = update.status not in ("running", "not-started")
        if finished and len(events) < EVENTS_PAGE:
            return events, None
        return events, str(last)

    async def history(self, ref: StackRef, page: int, page_size: int) -> list[UpdateRecord]:
        stack = await self.stack(ref)
        if not (1 <= page <= MAX_INT and 1 <= page_size <= MAX_INT):
            raise BadRequest("Bad Request: page and pageSize must be positive integers")
        return await self.store.list_history(stack.id, page, min(page_size, 1000))

    async def latest(self, ref: StackRef) -> UpdateRecord:
        updates = await self.history(ref, 1, 1)
        if not updates:
            raise NotFound(f"Not Found: stack '{ref}' has no updates")
        return updates[0]

    # -- secrets --------------------------------------------------------------------------

    async def _secrets_stack(self, ref: StackRef) -> StackRecord:
        self.check_owner(ref.org)
        stack = await self.store.get_stack_or_alias(ref)
        if stack is None:
            raise NotFound(f"Not Found: stack '{ref}' not found")
        return stack

    async def encrypt(self, ref: StackRef, plaintexts: list[bytes]) -> list[bytes]:
        stack = await self._secrets_stack(ref)
        return await self.secrets.encrypt(stack.id, plaintexts)

    async def decrypt(self, ref: StackRef, ciphertexts: list[bytes]) -> list[bytes]:
        stack = await self._secrets_stack(ref)
        return await self.secrets.decrypt(stack.id, ciphertexts)
