"""The service secrets manager: one data key per stack, wrapped by the master key.

Data keys are bound to the stack's internal id, which survives renames, so secrets written
under an old name still decrypt after `pulumi stack rename`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pulumid.errors import BadRequest
from pulumid.secrets import crypto
from pulumid.storage.interface import Store
from pulumid.threads import Runner

CANARY_KEY = "master_key_canary"


class MasterKeyMismatch(Exception):
    pass


def _context(stack_id: int) -> bytes:
    return b"pulumid/stack/%d" % stack_id


class StackSecrets:
    def __init__(
        self, store: Store, master: crypto.MasterKey, cpu: Runner, cache_size: int = 1024
    ) -> None:
        self._store = store
        self._master = master
        self._cpu = cpu
        self._keys: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_size

    async def check_master_key(self) -> None:
        """Store a canary on first start; refuse a different key on every later start."""
        canary = await self._store.set_meta_if_absent(CANARY_KEY, crypto.make_canary(self._master))
        if not crypto.check_canary(self._master, canary):
            raise MasterKeyMismatch(
                "the master key does not match the one this database was created with; "
                "start pulumid with the original key (PULUMID_MASTER_KEY)"
            )

    async def _data_key(self, stack_id: int) -> bytes:
        key = self._keys.get(stack_id)
        if key is not None:
            self._keys.move_to_end(stack_id)
            return key
        wrapped = await self._store.get_stack_key(stack_id)
        if wrapped is None:
            fresh = crypto.wrap_data_key(
                self._master, crypto.new_data_key(), context=_context(stack_id)
            )
            wrapped = await self._store.put_stack_key_if_absent(stack_id, fresh)
        key = crypto.unwrap_data_key(self._master, wrapped, context=_context(stack_id))
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
            return f(key, values, context=_context(stack_id))
        return await self._cpu.run(f, key, values, context=_context(stack_id))
