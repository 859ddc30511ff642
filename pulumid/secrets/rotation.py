"""Key rotation while the daemon serves: every data key not wrapped by the primary key is
unwrapped by the key that wrapped it and wrapped again by the primary, a batch per
transaction. A row changes only if its old key still wraps it (two nodes may race), so a
stack's key is readable under the old or the new key at every moment, and an interrupted
rotation goes on from what is left at the next tick: the rows are the progress.

Only a node whose primary is the database's newest recorded primary rotates (nodes that
still run the old configuration during a rolling restart must not turn it back).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.engine.secrets import (
    PRIMARY,
    SITE_CONTEXT,
    SITE_KEY,
    decode_wrapped,
    encode_wrapped,
    stack_context,
)
from pulumid.secrets import crypto
from pulumid.secrets.keys import KeyNotConfigured, Keyring
from pulumid.storage.faults import Faults
from pulumid.storage.interface import Store
from pulumid.storage.records import WrappedKey

log = Logger(namespace="pulumid.secrets")

CLAIM = "key-rotation"
# A rotating node holds the claim this long past its last batch: a node that died mid-way
# holds up no one for longer.
CLAIM_SECONDS = 30.0


@dataclass
class Progress:
    rewrapped: int = 0
    skipped: int = 0  # wrapped by a key this node does not have
    remaining: dict[str, int] | None = None  # key id -> stacks, after the run
    seconds: float = 0.0  # how long the run took (the reactor's clock)


class KeyRotation:
    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        clock: IReactorTime,
        node: str,
        batch: int = 100,
        faults: Faults | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._node = node
        self._batch = batch
        self._faults = faults or Faults()
        self.last: Progress | None = None
        self.counts: dict[str, int] = {}

    async def tick(self) -> None:
        """One pass, if this node may rotate and another is not at it."""
        self.counts = await self._store.count_stack_keys()
        primary = self._keyring.primary.key_id
        if not any(k != primary and n for k, n in self.counts.items()) and not (
            await self._site_key_pending()
        ):
            return
        recorded = await self._store.get_meta(PRIMARY)
        if recorded is not None and recorded.decode() != primary:
            log.warn(
                "not rotating keys: this node's primary {mine} is not the newest ({newest})",
                mine=primary,
                newest=recorded.decode(),
            )
            return
        if not await self._claim():
            return
        try:
            self.last = await self.run()
        finally:
            now = self._clock.seconds()
            await self._store.claim(CLAIM, self._node, now, now)

    async def _claim(self) -> bool:
        now = self._clock.seconds()
        return await self._store.claim(CLAIM, self._node, now, now + CLAIM_SECONDS)

    async def _site_key_pending(self) -> bool:
        stored = await self._store.get_meta(SITE_KEY)
        return stored is not None and decode_wrapped(stored).key_id != self._keyring.primary.key_id

    async def run(self) -> Progress:
        primary = self._keyring.primary
        progress = Progress()
        started = self._clock.seconds()
        after = 0
        log.info("re-wrapping data keys under {key}", key=primary.key_id)
        while True:
            rows = await self._store.stack_keys_not_wrapped_by(primary.key_id, after, self._batch)
            if not rows:
                break
            after = rows[-1][0]
            changes: list[tuple[int, str, WrappedKey]] = []
            for stack_id, key in rows:
                context = stack_context(stack_id)
                try:
                    data_key = await self._keyring.unwrap(key, context)
                except KeyNotConfigured:
                    progress.skipped += 1
                    continue
                except crypto.DecryptionError as e:
                    # One damaged row must not hold up every other stack's rotation.
                    log.error(
                        "the data key of stack {stack} does not unwrap: {error}",
                        stack=stack_id,
                        error=str(e),
                    )
                    progress.skipped += 1
                    continue
                changes.append((stack_id, key.key_id, await self._keyring.wrap(data_key, context)))
            progress.rewrapped += await self._store.rewrap_stack_keys(changes)
            self._faults.hit("rewrapped")
            await self._claim()  # still at it: hold the claim a while longer
        stored = await self._store.get_meta(SITE_KEY)
        if stored is not None:
            site = decode_wrapped(stored)
            if site.key_id != primary.key_id and site.key_id in self._keyring.keys:
                data_key = await self._keyring.unwrap(site, SITE_CONTEXT)
                fresh = await self._keyring.wrap(data_key, SITE_CONTEXT)
                await self._store.put_meta(SITE_KEY, encode_wrapped(fresh))
        progress.remaining = self.counts = await self._store.count_stack_keys()
        progress.seconds = self._clock.seconds() - started
        retired = [k for k in self._keyring.keys if k != primary.key_id and not self.counts.get(k)]
        log.info(
            "re-wrapped {count} data keys under {key}; no longer used: {retired}",
            count=progress.rewrapped,
            key=primary.key_id,
            retired=", ".join(retired) or "-",
        )
        if progress.skipped:
            log.error(
                "{count} data keys are wrapped by keys this node does not have",
                count=progress.skipped,
            )
        return progress
