"""The service secrets manager: one data key per stack, wrapped by the keyring's primary key.

Data keys are bound to the stack's internal id, which survives renames, so secrets written
under an old name still decrypt after `pulumi stack rename`. Each wrapped key names the key
that wrapped it: rotation (pulumid.secrets.rotation) re-wraps them under a new primary while
any configured key still opens what it wrapped.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Callable

from twisted.logger import Logger

from pulumid.errors import BadRequest, Unavailable
from pulumid.secrets import crypto
from pulumid.secrets.keys import (
    CANARY_CONTEXT,
    CANARY_PLAINTEXT,
    CANARY_PREFIX,
    KeyNotConfigured,
    KeyProvider,
    Keyring,
)
from pulumid.storage.interface import Store
from pulumid.storage.records import WrappedKey
from pulumid.threads import Runner

log = Logger(namespace="pulumid.secrets")

# The canary of databases from before key ids: opened by the master key they were made with.
LEGACY_CANARY = "master_key_canary"
# The site's own data key (sign-in state, sealed refresh tokens), wrapped like a stack's.
SITE_KEY = "site_key"
SITE_CONTEXT = b"pulumid/site-key/v1"
# The primary key of the newest started node: only a node with that primary rotates.
PRIMARY = "secrets_primary"


class MasterKeyMismatch(Exception):
    pass


def stack_context(stack_id: int) -> bytes:
    return b"pulumid/stack/%d" % stack_id


def encode_wrapped(key: WrappedKey) -> bytes:
    return json.dumps(
        {"key_id": key.key_id, "wrapped": base64.b64encode(key.wrapped).decode()}
    ).encode()


def decode_wrapped(raw: bytes) -> WrappedKey:
    value = json.loads(raw)
    return WrappedKey(str(value["key_id"]), base64.b64decode(value["wrapped"]))


class StackSecrets:
    def __init__(self, store: Store, keyring: Keyring, cpu: Runner, cache_size: int = 1024) -> None:
        self._store = store
        self.keyring = keyring
        self._cpu = cpu
        self._keys: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_size

    # -- start and readiness --------------------------------------------------------------

    async def check_keys(self) -> None:
        """Refuse to start unless every configured key opens its canary and every key that
        wraps something stored is configured; adopt the data keys of older databases."""
        for key in self.keyring.keys.values():
            await self.check_canary(key)
        site = await self._store.get_meta(SITE_KEY)
        counts = await self._store.count_stack_keys()
        if await self._adopt_legacy(site is None, counts.get("", 0)):
            counts = await self._store.count_stack_keys()
        in_use = {k: n for k, n in counts.items() if n}
        for key_id, count in sorted(in_use.items()):
            if key_id not in self.keyring.keys:
                raise MasterKeyMismatch(
                    f"{count} stacks' data keys are wrapped by {key_id}, which is not "
                    "configured: start pulumid with that key (the master key this database "
                    "was used with, or --previous-secrets-key)"
                )
        if site is not None:
            key_id = decode_wrapped(site).key_id
            if key_id not in self.keyring.keys:
                raise MasterKeyMismatch(
                    f"the site key is wrapped by {key_id}, which is not configured: start "
                    "pulumid with that key (the master key this database was used with, or "
                    "--previous-secrets-key)"
                )
        await self._store.put_meta(PRIMARY, self.keyring.primary.key_id.encode())

    async def check_canary(self, key: KeyProvider) -> None:
        """KEY opens the canary stored for it (one is stored the first time)."""
        name = CANARY_PREFIX + key.key_id
        canary = await self._store.get_meta(name)
        if canary is None:
            fresh = await key.wrap(CANARY_PLAINTEXT, CANARY_CONTEXT)
            canary = await self._store.set_meta_if_absent(name, fresh)
        try:
            opened = await key.unwrap(canary, CANARY_CONTEXT)
        except crypto.DecryptionError:
            opened = b""
        if opened != CANARY_PLAINTEXT:
            raise MasterKeyMismatch(f"the key {key.key_id} does not open its stored canary")

    async def _adopt_legacy(self, no_site_key: bool, unnamed: int) -> bool:
        """Data keys stored before key ids were wrapped by the master key of the time: find
        it among the configured local keys by the old canary and record its id. True when
        rows were adopted. UNNAMED: how many such rows there are."""
        legacy = await self._store.get_meta(LEGACY_CANARY)
        if legacy is None:
            return False
        owner = next(
            (k for k in self.keyring.local_keys() if crypto.check_canary(k.master, legacy)), None
        )
        if owner is None:
            if unnamed or no_site_key:
                raise MasterKeyMismatch(
                    "the master key does not match the one this database was created with; "
                    "start pulumid with the original key (PULUMID_MASTER_KEY)"
                )
            return False
        adopted = unnamed > 0
        after = 0
        while unnamed:
            rows = await self._store.stack_keys_not_wrapped_by(owner.key_id, after, 500)
            if not rows:
                break
            named = [
                (sid, "", WrappedKey(owner.key_id, k.wrapped)) for sid, k in rows if not k.key_id
            ]
            unnamed -= await self._store.rewrap_stack_keys(named)
            after = rows[-1][0]
        return adopted

    # -- the site key ---------------------------------------------------------------------

    async def site_key(self) -> bytes:
        stored = await self._store.get_meta(SITE_KEY)
        if stored is None:
            fresh = await self.keyring.wrap(crypto.new_data_key(), SITE_CONTEXT)
            stored = await self._store.set_meta_if_absent(SITE_KEY, encode_wrapped(fresh))
        return await self._unwrap(decode_wrapped(stored), SITE_CONTEXT)

    # -- stack data keys ------------------------------------------------------------------

    async def _unwrap(self, key: WrappedKey, context: bytes) -> bytes:
        try:
            return await self.keyring.unwrap(key, context)
        except KeyNotConfigured as e:
            raise Unavailable(f"Service Unavailable: {e}") from None
        except crypto.DecryptionError as e:
            log.error("a data key could not be unwrapped: {error}", error=str(e))
            raise Unavailable(
                f"Service Unavailable: the data key could not be unwrapped by {key.key_id}"
            ) from None

    async def _data_key(self, stack_id: int) -> bytes:
        key = self._keys.get(stack_id)
        if key is not None:
            self._keys.move_to_end(stack_id)
            return key
        context = stack_context(stack_id)
        wrapped = await self._store.get_stack_key(stack_id)
        if wrapped is None:
            fresh = await self.keyring.wrap(crypto.new_data_key(), context)
            wrapped = await self._store.put_stack_key_if_absent(stack_id, fresh)
        key = await self._unwrap(wrapped, context)
        if len(key) != crypto.KEY_SIZE:
            raise Unavailable("Service Unavailable: the stored data key is not a data key")
        self._keys[stack_id] = key
        if len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)
        return key

    def forget(self, stack_id: int) -> None:
        self._keys.pop(stack_id, None)

    async def encrypt(self, stack_id: int, plaintexts: list[bytes]) -> list[bytes]:
        key = await self._data_key(stack_id)
        return await self._run(crypto.encrypt_many, key, plaintexts, stack_id)

    async def decrypt(self, stack_id: int, ciphertexts: list[bytes]) -> list[bytes]:
        key = await self._data_key(stack_id)
        try:
            return await self._run(crypto.decrypt_many, key, ciphertexts, stack_id)
        except crypto.DecryptionError as e:
            raise BadRequest(f"Bad Request: could not decrypt: {e}") from None

    async def _run(
        self, f: Callable[..., list[bytes]], key: bytes, values: list[bytes], stack_id: int
    ) -> list[bytes]:
        # Small batches are cheaper inline than a thread hop.
        if sum(len(v) for v in values) < 64 * 1024:
            return f(key, values, context=stack_context(stack_id))
        return await self._cpu.run(f, key, values, context=stack_context(stack_id))
