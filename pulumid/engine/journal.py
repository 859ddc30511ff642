"""Turn a journaling update's entries into the stack's new deployment (reference §6).

With journaling the CLI sends no checkpoints, only entries such as "operation 7 began",
"operation 7 produced this resource and superseded base resource 3". The server owns the
replay: the deployment the update started from (the base) plus the entries, applied in
sequenceID order, give the new state. The rules follow the CLI's own replayer
(`pkg/backend/journal.go`) so that what we store is what a checkpointing CLI would have
written.

Everything here is pure: no I/O and no clock (the caller passes the time in).

Ownership: the replayer keeps references to the base and to the entries' `state`,
`operation` and other values instead of copying them, and never mutates them. Resources
it has to change (flags, pruned dependencies, alias rewrites) are shallow-copied first.
Callers must not mutate what they handed in, nor what `generate` returns (copy it first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

KIND_BEGIN = 0
KIND_SUCCESS = 1
KIND_FAILURE = 2
KIND_REFRESH_SUCCESS = 3
KIND_OUTPUTS = 4
KIND_WRITE = 5
KIND_SECRETS_MANAGER = 6
KIND_REBUILT_BASE_STATE = 7
KIND_EXTENSION_PARAMETERIZE = 8
KIND_SNIPPETS = 9

URN_PREFIX = "urn:pulumi:"
STACK_TYPE = "pulumi:pulumi:Stack"
# What a provider reference with an empty ID becomes when it is re-serialised.
UNKNOWN_PROVIDER_ID = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"

_MISSING: Any = object()


class JournalError(ValueError):
    """A journal entry is malformed or inconsistent with the state it applies to."""


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    kind: int
    op: int
    remove_old: int | None
    remove_new: int | None
    pending_old: int | None
    pending_new: int | None
    delete_old: int | None
    delete_new: int | None
    state: dict[str, Any] | None
    operation: dict[str, Any] | None
    is_refresh: bool
    requires_bytestring: bool
    secrets_provider: dict[str, Any] | None
    snippets: list[Any] | None
    new_snapshot: dict[str, Any] | None
    extension_ref: str | None
    extension: dict[str, Any] | None


# ----------------------------------------------------------------------------------------
# Parsing: everything that can be checked on an entry alone.


def _int(raw: dict[str, Any], key: str, where: str, *, required: bool = False) -> int | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise JournalError(f"{where}: missing {key}")
        return None
    # JSON true/false decode to bool, which Python counts as int.
    if isinstance(value, bool) or not isinstance(value, int):
        raise JournalError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _flag(raw: dict[str, Any], key: str, where: str) -> bool:
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise JournalError(f"{where}: {key} must be a boolean")
    return value


def _object(raw: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise JournalError(f"{where}: {key} must be an object")
    return value


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise JournalError(f"{where}: {key} must be an array")
    return value


def _is_urn_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(u, str) for u in value)


def _check_resource(value: Any, where: str) -> dict[str, Any]:
    """The fields the replay reads must have their JSON types, so generate cannot trip."""
    if not isinstance(value, dict):
        raise JournalError(f"{where} must be an object")
    for key in ("urn", "type"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise JournalError(f"{where} needs a non-empty string {key!r}")
    for key in ("parent", "provider", "deletedWith", "viewOf", "extensionRef", "snippetID"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise JournalError(f"{where}: {key} must be a string")
    for key in ("dependencies", "replaceWith", "aliases"):
        if value.get(key) is not None and not _is_urn_list(value[key]):
            raise JournalError(f"{where}: {key} must be an array of strings")
    prop_deps = value.get("propertyDependencies")
    if prop_deps is not None and not (
        isinstance(prop_deps, dict)
        and all(urns is None or _is_urn_list(urns) for urns in prop_deps.values())
    ):
        raise JournalError(f"{where}: propertyDependencies must map to arrays of strings")
    return value


def _check_deployment(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JournalError(f"{where} must be an object")
    for key in ("resources", "pending_operations"):
        items = value.get(key)
        if items is not None and not isinstance(items, list):
            raise JournalError(f"{where}: {key} must be an array")
    for i, res in enumerate(value.get("resources") or []):
        if not isinstance(res, dict):
            raise JournalError(f"{where}: resources[{i}] must be an object")
    for i, op in enumerate(value.get("pending_operations") or []):
        if not isinstance(op, dict) or not isinstance(op.get("resource"), dict):
            raise JournalError(f"{where}: pending_operations[{i}] must be an operation")
    return value


def _parse(raw: Any) -> _Entry:
    if not isinstance(raw, dict):
        raise JournalError("journal entry must be a JSON object")
    seq = _int(raw, "sequenceID", "journal entry", required=True)
    assert seq is not None
    if seq < 1:
        raise JournalError(f"journal entry: sequenceID must be at least 1, got {seq}")
    where = f"journal entry {seq}"
    kind = _int(raw, "kind", where, required=True)
    assert kind is not None
    if not KIND_BEGIN <= kind <= KIND_SNIPPETS:
        raise JournalError(f"{where}: unknown kind {kind}")
    op = _int(raw, "operationID", where, required=True)
    assert op is not None
    if op < 0:
        raise JournalError(f"{where}: operationID must not be negative")

    state = _object(raw, "state", where)
    if state is not None:
        _check_resource(state, f"{where}: state")
    operation = _object(raw, "operation", where)
    if operation is not None:
        _check_resource(operation.get("resource"), f"{where}: operation.resource")
        if not isinstance(operation.get("type"), str):
            raise JournalError(f"{where}: operation.type must be a string")
    secrets_provider = _object(raw, "secretsProvider", where)
    if secrets_provider is not None and not isinstance(secrets_provider.get("type"), str):
        raise JournalError(f"{where}: secretsProvider.type must be a string")
    snippets = _list(raw, "snippets", where)
    if snippets is not None and not all(isinstance(s, dict) for s in snippets):
        raise JournalError(f"{where}: snippets must be objects")
    new_snapshot = raw.get("newSnapshot")
    if new_snapshot is not None:
        _check_deployment(new_snapshot, f"{where}: newSnapshot")
    extension_ref = raw.get("extensionRef")
    if extension_ref is not None and not isinstance(extension_ref, str):
        raise JournalError(f"{where}: extensionRef must be a string")
    extension = _object(raw, "extension", where)

    # Entries that would do nothing (or crash the CLI's replayer) without their payload.
    if kind == KIND_WRITE and new_snapshot is None:
        raise JournalError(f"{where}: a write entry needs newSnapshot")
    if kind == KIND_SECRETS_MANAGER and secrets_provider is None:
        raise JournalError(f"{where}: a secrets-manager entry needs secretsProvider")
    if kind == KIND_EXTENSION_PARAMETERIZE and (extension_ref is None or extension is None):
        raise JournalError(f"{where}: an extension entry needs extensionRef and extension")

    return _Entry(
        seq=seq,
        kind=kind,
        op=op,
        remove_old=_int(raw, "removeOld", where),
        remove_new=_int(raw, "removeNew", where),
        pending_old=_int(raw, "pendingReplacementOld", where),
        pending_new=_int(raw, "pendingReplacementNew", where),
        delete_old=_int(raw, "deleteOld", where),
        delete_new=_int(raw, "deleteNew", where),
        state=state,
        operation=operation,
        is_refresh=_flag(raw, "isRefresh", where),
        requires_bytestring=_flag(raw, "requiresByteString", where),
        secrets_provider=secrets_provider,
        snippets=snippets,
        new_snapshot=new_snapshot,
        extension_ref=extension_ref,
        extension=extension,
    )


# ----------------------------------------------------------------------------------------
# Replay state, and an undo log so that a rejected batch leaves no trace.


class _State:
    """The CLI replayer's bookkeeping: base plus what the entries did to it."""

    __slots__ = (
        "base",
        "drop_base",
        "drop_new",
        "exts",
        "flag_delete",
        "flag_pending",
        "needs_bytestring",
        "new",
        "open",
        "pos",
        "refreshed",
        "replace_base",
    )

    def __init__(self, base: dict[str, Any]) -> None:
        # Treated as immutable: entries that change it install a new dict.
        self.base = base
        self.new: list[dict[str, Any]] = []  # resulting resources, in completion order
        self.pos: dict[int, int] = {}  # operation ID -> index in `new`
        self.drop_new: set[int] = set()  # operation IDs whose resource is gone
        self.drop_base: set[int] = set()  # base indices that are gone
        self.replace_base: dict[int, dict[str, Any]] = {}  # base index -> replacement
        self.flag_delete: set[int] = set()  # base indices to mark `delete`
        self.flag_pending: set[int] = set()  # base indices to mark `pendingReplacement`
        self.open: dict[int, _Entry] = {}  # operation ID -> its begin entry
        self.refreshed = False
        self.needs_bytestring = False
        self.exts: dict[str, Any] = {}

    def clone(self) -> _State:
        # Resources are never mutated in place, so copying the containers is enough.
        other = _State(self.base)
        other.new = list(self.new)
        other.pos = dict(self.pos)
        other.drop_new = set(self.drop_new)
        other.drop_base = set(self.drop_base)
        other.replace_base = dict(self.replace_base)
        other.flag_delete = set(self.flag_delete)
        other.flag_pending = set(self.flag_pending)
        other.open = dict(self.open)
        other.refreshed = self.refreshed
        other.needs_bytestring = self.needs_bytestring
        other.exts = dict(self.exts)
        return other

    def base_resources(self) -> list[dict[str, Any]]:
        return self.base.get("resources") or []


class _Log:
    """Applies mutations, remembering (when recording) how to revert them."""

    def __init__(self, record: bool) -> None:
        self.undo: list[Callable[[], None]] | None = [] if record else None

    def _remember(self, step: Callable[[], None]) -> None:
        if self.undo is not None:
            self.undo.append(step)

    def rollback(self) -> None:
        if self.undo is not None:
            while self.undo:
                self.undo.pop()()

    def add(self, items: set[int], item: int) -> None:
        if item not in items:
            items.add(item)
            self._remember(lambda: items.discard(item))

    def put(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        old = mapping.get(key, _MISSING)
        mapping[key] = value

        def revert() -> None:
            if old is _MISSING:
                del mapping[key]
            else:
                mapping[key] = old

        self._remember(revert)

    def pop(self, mapping: dict[Any, Any], key: Any) -> None:
        if key in mapping:
            old = mapping.pop(key)
            self._remember(lambda: mapping.__setitem__(key, old))

    def append(self, items: list[Any], item: Any) -> None:
        items.append(item)
        self._remember(items.pop)

    def replace(self, items: list[Any], index: int, item: Any) -> None:
        old = items[index]
        items[index] = item
        self._remember(lambda: items.__setitem__(index, old))

    def assign(self, target: object, name: str, value: Any) -> None:
        old = getattr(target, name)
        setattr(target, name, value)
        self._remember(lambda: setattr(target, name, old))


# ----------------------------------------------------------------------------------------
# Applying one entry: every check first, then the mutations.


def _check_base_index(e: _Entry, name: str, index: int | None, base_len: int) -> None:
    if index is not None and not 0 <= index < base_len:
        raise JournalError(
            f"journal entry {e.seq}: {name} {index} is outside the base deployment's "
            f"{base_len} resources"
        )


def _check_operation(e: _Entry, name: str, op: int | None, st: _State, own: bool) -> None:
    if op is None or op in st.pos or (own and op == e.op):
        return
    raise JournalError(
        f"journal entry {e.seq}: {name} refers to operation {op}, which produced no resource"
    )


def _with_flag(res: dict[str, Any], key: str) -> dict[str, Any]:
    return res if res.get(key) is True else {**res, key: True}


def _shared(st: _State, index: int | None, state: dict[str, Any]) -> dict[str, Any]:
    """The base's resource at `index` when `state` equals it, else `state`.

    A step that changes nothing (most of a large stack's update) sends the resource again;
    keeping the base's copy instead lets the entry's be freed, so an update holds about one
    copy of its stack, not two.
    """
    if index is None:
        return state
    base = st.base_resources()[index]
    return base if base == state else state


def _apply(st: _State, e: _Entry, log: _Log) -> None:
    kind = e.kind
    base_len = len(st.base_resources())
    rebuilt: dict[str, Any] | None = None

    if kind == KIND_SUCCESS:
        _check_base_index(e, "removeOld", e.remove_old, base_len)
        _check_base_index(e, "deleteOld", e.delete_old, base_len)
        _check_base_index(e, "pendingReplacementOld", e.pending_old, base_len)
        # The entry's own resource is appended before its references are resolved.
        own = e.state is not None
        _check_operation(e, "removeNew", e.remove_new, st, own)
        _check_operation(e, "deleteNew", e.delete_new, st, own)
        _check_operation(e, "pendingReplacementNew", e.pending_new, st, own)
    elif kind == KIND_REFRESH_SUCCESS or (kind == KIND_OUTPUTS and e.state is not None):
        _check_base_index(e, "removeOld", e.remove_old, base_len)
        _check_operation(e, "removeNew", e.remove_new, st, False)
    elif kind == KIND_REBUILT_BASE_STATE:
        # Can fail (conflicting aliases), so it happens before anything changes.
        rebuilt = _build(st, now_iso="", engine_version="")["deployment"]

    if e.requires_bytestring and not st.needs_bytestring:
        log.assign(st, "needs_bytestring", True)

    if kind == KIND_BEGIN:
        log.put(st.open, e.op, e)
    elif kind == KIND_SUCCESS:
        log.pop(st.open, e.op)
        if e.state is not None:
            log.put(st.pos, e.op, len(st.new))
            log.append(st.new, _shared(st, e.remove_old, e.state))
        if e.remove_old is not None:
            log.add(st.drop_base, e.remove_old)
        if e.remove_new is not None:
            log.add(st.drop_new, e.remove_new)
        if e.delete_old is not None:
            log.add(st.flag_delete, e.delete_old)
        if e.delete_new is not None:
            i = st.pos[e.delete_new]
            log.replace(st.new, i, _with_flag(st.new[i], "delete"))
        if e.pending_old is not None:
            log.add(st.flag_pending, e.pending_old)
        if e.pending_new is not None:
            i = st.pos[e.pending_new]
            log.replace(st.new, i, _with_flag(st.new[i], "pendingReplacement"))
        if e.is_refresh and not st.refreshed:
            log.assign(st, "refreshed", True)
    elif kind == KIND_FAILURE:
        # Whatever state a failure carries is not part of the snapshot.
        log.pop(st.open, e.op)
    elif kind == KIND_REFRESH_SUCCESS:
        log.pop(st.open, e.op)
        if not st.refreshed:
            log.assign(st, "refreshed", True)
        if e.remove_old is not None:
            if e.state is None:
                log.add(st.drop_base, e.remove_old)
            else:
                log.put(st.replace_base, e.remove_old, _shared(st, e.remove_old, e.state))
        if e.remove_new is not None:
            if e.state is None:
                log.add(st.drop_new, e.remove_new)
            else:
                log.replace(st.new, st.pos[e.remove_new], e.state)
    elif kind == KIND_OUTPUTS:
        if e.state is not None and e.remove_old is not None:
            log.put(st.replace_base, e.remove_old, e.state)
        if e.state is not None and e.remove_new is not None:
            log.replace(st.new, st.pos[e.remove_new], e.state)
    elif kind == KIND_WRITE:
        # The engine rewrote its base (e.g. a migration); sent before any step entry.
        log.assign(st, "base", e.new_snapshot)
    elif kind == KIND_SECRETS_MANAGER:
        provider = e.secrets_provider
        assert provider is not None
        current = st.base.get("secrets_providers")
        # Keep the base's provider when it is the same one, so nothing is re-encrypted.
        unchanged = (
            isinstance(current, dict)
            and current.get("type") == provider.get("type")
            and current.get("state") == provider.get("state")
        )
        if not unchanged:
            log.assign(st, "base", {**st.base, "secrets_providers": provider})
    elif kind == KIND_SNIPPETS:
        log.assign(st, "base", {**st.base, "snippets": e.snippets})
    elif kind == KIND_EXTENSION_PARAMETERIZE:
        log.put(st.exts, e.extension_ref, e.extension)
    elif kind == KIND_REBUILT_BASE_STATE:
        # After a refresh the engine rebuilt its base; later indices refer to that.
        log.assign(st, "base", rebuilt)
        log.assign(st, "new", [])
        log.assign(st, "pos", {})
        log.assign(st, "drop_new", set())
        log.assign(st, "drop_base", set())
        log.assign(st, "replace_base", {})
        log.assign(st, "flag_delete", set())
        log.assign(st, "flag_pending", set())
        log.assign(st, "open", {})
        log.assign(st, "exts", {})


# ----------------------------------------------------------------------------------------
# Building the deployment.


def _collect_features(res: dict[str, Any], features: set[str]) -> None:
    if res.get("refreshBeforeUpdate"):
        features.add("refreshBeforeUpdate")
    if res.get("viewOf"):
        features.add("views")
    if res.get("resourceHooks"):
        features.add("hooks")
    if res.get("taint"):
        features.add("taint")
    if res.get("replaceWith"):
        features.add("replaceWith")
    if res.get("extensionRef"):
        features.add("extensionParameterization")
    if res.get("snippetID"):
        features.add("snippets-prototype")


def _rebuild_dependencies(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop references to resources a refresh deleted (the list is in dependency order).

    Only URNs of resources earlier in the list count, and only fields that were
    non-empty are rewritten (emptied ones are removed, as the CLI omits empty fields).
    """
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for res in resources:
        changes: dict[str, Any] = {}
        for key in ("dependencies", "replaceWith"):
            urns = res.get(key)
            if urns:
                kept = [u for u in urns if u in seen]
                if len(kept) != len(urns):
                    changes[key] = kept
        prop_deps = res.get("propertyDependencies")
        if prop_deps:
            pruned = {}
            for name, urns in prop_deps.items():
                kept = [u for u in urns or () if u in seen]
                if kept:
                    pruned[name] = kept
            if pruned != prop_deps:
                changes["propertyDependencies"] = pruned
        deleted_with = res.get("deletedWith")
        if deleted_with and deleted_with not in seen:
            changes["deletedWith"] = ""
        out.append(_changed(res, changes) if changes else res)
        seen.add(res.get("urn", ""))

    # A parent the refresh deleted: take the parent's recorded parent. Only resources in
    # the list have a record, so in practice this clears the parent, as the CLI does.
    parent_of: dict[str, str] = {}
    for i, res in enumerate(out):
        parent = res.get("parent") or ""
        if parent and parent not in seen:
            out[i] = _changed(res, {"parent": parent_of.get(parent, "")})
        parent_of[res.get("urn", "")] = parent
    return out


def _changed(res: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `res` with `changes`; empty values are dropped like the CLI's omitempty."""
    out = {**res, **changes}
    for key, value in changes.items():
        if not value:
            del out[key]
    return out


def _split_urn(urn: str) -> list[str] | None:
    """[stack, project, qualified type, name] (only the name may contain "::")."""
    if not urn.startswith(URN_PREFIX):
        return None
    parts = urn[len(URN_PREFIX) :].split("::", 3)
    return parts if len(parts) == 4 else None


def _normalise_aliases(
    resources: list[dict[str, Any]], snippets: list[Any] | None
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Rewrite URN references that use a resource's alias to its current URN."""
    aliased: dict[str, str] = {}
    for res in resources:
        urn = res.get("urn", "")
        for alias in res.get("aliases") or ():
            other = aliased.get(alias)
            if other is not None and other != urn:
                raise JournalError(
                    f"two resources ({other!r} and {urn!r}) have the same alias {alias!r}"
                )
            aliased[alias] = urn
        # A child whose parent was renamed into a component gets the parent's type prefix.
        new_parent = aliased.get(res.get("parent") or "")
        if new_parent:
            parent_parts = _split_urn(new_parent)
            parts = _split_urn(urn)
            if parent_parts and parts and parent_parts[2] != STACK_TYPE:
                stack, project, qualified_type, name = parts
                base_type = qualified_type.rsplit("$", 1)[-1]
                aliased[urn] = (
                    f"{URN_PREFIX}{stack}::{project}::{parent_parts[2]}${base_type}::{name}"
                )

    def fix(urn: str) -> str:
        return aliased.get(urn, urn)

    out: list[dict[str, Any]] = []
    for res in resources:
        changes: dict[str, Any] = {}
        for key in ("urn", "parent", "deletedWith", "viewOf"):
            value = res.get(key)
            if value and fix(value) != value:
                changes[key] = fix(value)
        provider = res.get("provider")
        if provider:
            cut = provider.rfind("::")
            if cut >= 0:
                fixed = f"{fix(provider[:cut])}::{provider[cut + 2 :] or UNKNOWN_PROVIDER_ID}"
                if fixed != provider:
                    changes["provider"] = fixed
        deps = res.get("dependencies")
        if deps and any(d in aliased for d in deps):
            changes["dependencies"] = [fix(d) for d in deps]
        prop_deps = res.get("propertyDependencies")
        if prop_deps and any(d in aliased for urns in prop_deps.values() for d in urns or ()):
            changes["propertyDependencies"] = {
                k: [fix(d) for d in urns] if urns else urns for k, urns in prop_deps.items()
            }
        if changes or "aliases" in res:
            res = {**res, **changes}
            res.pop("aliases", None)
        out.append(res)

    if snippets and aliased:
        new_snippets: list[Any] = []
        for snippet in snippets:
            refs = snippet.get("references")
            if refs and any(v in aliased for v in refs.values()):
                snippet = {**snippet, "references": {k: fix(v) for k, v in refs.items()}}
            new_snippets.append(snippet)
        snippets = new_snippets
    return out, snippets


def walks_the_state(raw: Any) -> bool:
    """Whether applying this (unparsed) entry may take time in proportion to the whole state:
    a rebuilt base or a new snapshot, or aliases (checked against every resource)."""
    if not isinstance(raw, dict):
        return False
    if raw.get("kind") in (KIND_REBUILT_BASE_STATE, KIND_WRITE) or "newSnapshot" in raw:
        return True
    state, operation = raw.get("state"), raw.get("operation")
    resource = operation.get("resource") if isinstance(operation, dict) else None
    return any(isinstance(res, dict) and "aliases" in res for res in (state, resource))


def _has_aliases(entry: _Entry) -> bool:
    resources = (entry.state, (entry.operation or {}).get("resource"))
    return any(res is not None and "aliases" in res for res in resources) or (
        entry.new_snapshot is not None
        and any("aliases" in res for res in entry.new_snapshot.get("resources") or ())
    )


def _needs_normalising(res: dict[str, Any]) -> bool:
    provider = res.get("provider")
    return "aliases" in res or (isinstance(provider, str) and provider.endswith("::"))


def _build(st: _State, *, now_iso: str, engine_version: str) -> dict[str, Any]:
    """The UntypedDeployment for the current replay state (reference §6.5 generate())."""
    base = st.base
    features: set[str] = set()
    if st.needs_bytestring:
        features.add("byteString")

    # New resources first, then the surviving base: that keeps dependency order.
    dropped = {st.pos[op] for op in st.drop_new if op in st.pos}
    resources = [res for i, res in enumerate(st.new) if i not in dropped]
    for i, res in enumerate(st.base_resources()):
        if i in st.drop_base:
            continue
        replacement = st.replace_base.get(i)
        if replacement is not None:
            # A refreshed or re-output resource replaces the old one, flags and all.
            resources.append(replacement)
            continue
        if i in st.flag_pending:
            res = _with_flag(res, "pendingReplacement")
        if i in st.flag_delete:
            res = _with_flag(res, "delete")
        resources.append(res)

    operations = [
        entry.operation for _, entry in sorted(st.open.items()) if entry.operation is not None
    ]
    # Interrupted creates need the user's attention, so they survive; the rest are dropped.
    operations += [
        op for op in base.get("pending_operations") or () if op.get("type") == "creating"
    ]

    # Features come from the resources as recorded, before any pruning below.
    normalise = False
    for res in resources:
        _collect_features(res, features)
        normalise = normalise or _needs_normalising(res)
    for op in operations:
        _collect_features(op["resource"], features)

    if st.refreshed:
        resources = _rebuild_dependencies(resources)

    snippets = base.get("snippets")
    if normalise:
        resources, snippets = _normalise_aliases(resources, snippets)

    magic = hashlib.sha256(engine_version.encode()).hexdigest() if engine_version else ""
    deployment: dict[str, Any] = {
        "manifest": {"time": now_iso, "magic": magic, "version": engine_version},
    }
    if base.get("secrets_providers") is not None:
        deployment["secrets_providers"] = base["secrets_providers"]
    if resources:
        deployment["resources"] = resources
    if operations:
        deployment["pending_operations"] = operations
    deployment["metadata"] = base.get("metadata") or {}
    if snippets:
        deployment["snippets"] = snippets
        features.add("snippets-prototype")
    # The base's own extensions win over ones this update produced.
    extensions = {**st.exts, **(base.get("extensions") or {})}
    if extensions:
        deployment["extensions"] = extensions

    result: dict[str, Any] = {"version": 4 if features else 3}
    if features:
        result["features"] = sorted(features)
    result["deployment"] = deployment
    return result


# ----------------------------------------------------------------------------------------


class JournalReplayer:
    """Incrementally replays one update's journal onto its base deployment.

    `base` is the DeploymentV3 the CLI loaded at update start: the `*Old` fields of the
    entries are indices into its `resources`, so its order must be exactly that.
    """

    def __init__(self, base: dict[str, Any]) -> None:
        self._state = _State(_check_deployment(base, "base deployment"))
        self._applied_through = 0
        # Bytes of JSON text this replayer was built from: a cache's estimate of its size.
        self.text_bytes = 0
        # Stored journal batches it has applied (its owner keeps this in step with the store).
        self.batches = 0
        # Entries that arrived ahead of a gap in the sequence, by sequenceID.
        self._pending: dict[int, _Entry] = {}

    @property
    def applied_through(self) -> int:
        """The highest sequenceID such that it and every earlier entry have been applied."""
        return self._applied_through

    @property
    def entry_count(self) -> int:
        """Distinct entries accepted so far, applied or waiting behind a gap."""
        return self._applied_through + len(self._pending)

    @property
    def pending_count(self) -> int:
        """Entries waiting for an earlier sequenceID to arrive."""
        return len(self._pending)

    def add(self, entries: Iterable[dict[str, Any]], *, check: bool = False) -> None:
        """Accept a batch in any order, ignoring sequenceIDs already seen.

        All or nothing: on JournalError the replayer is exactly as before the call. With
        `check`, a batch that brings aliases is refused when the deployment could no longer
        be generated (two resources claiming one alias), so a state that was acknowledged
        can always be built.
        """
        parsed = [_parse(raw) for raw in entries]
        log = _Log(record=True)
        start = self._applied_through
        fresh: list[int] = []
        for entry in parsed:
            if entry.seq <= self._applied_through or entry.seq in self._pending:
                continue  # a retried copy: the first one wins
            self._pending[entry.seq] = entry
            fresh.append(entry.seq)

        taken: list[_Entry] = []
        try:
            while (nxt := self._pending.get(self._applied_through + 1)) is not None:
                _apply(self._state, nxt, log)
                del self._pending[nxt.seq]
                taken.append(nxt)
                self._applied_through = nxt.seq
            if check and any(_has_aliases(entry) for entry in taken):
                _build(self._state, now_iso="", engine_version="")
        except BaseException:
            # Whatever went wrong, leave no trace of this batch.
            log.rollback()
            self._applied_through = start
            for entry in taken:
                self._pending[entry.seq] = entry
            for seq in fresh:
                del self._pending[seq]
            raise

    def generate(self, *, now_iso: str, engine_version: str) -> dict[str, Any]:
        """The complete UntypedDeployment ({version, [features], deployment}) so far.

        Entries held back by a gap are applied too, in sequence order, on a scratch copy:
        they stay pending, and one that cannot apply without the missing entries is left
        out. Raises JournalError if two resources claim the same alias.
        """
        state = self._state
        if self._pending:
            state = state.clone()
            for seq in sorted(self._pending):
                try:
                    _apply(state, self._pending[seq], _Log(record=False))
                except JournalError:
                    continue  # checks run before any change, so nothing half-applied
        return _build(state, now_iso=now_iso, engine_version=engine_version)
