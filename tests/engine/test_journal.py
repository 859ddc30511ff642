"""Hand-written cases for the journal replay (reference §6.3-§6.5)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from pulumid.engine.journal import (
    KIND_BEGIN,
    KIND_EXTENSION_PARAMETERIZE,
    KIND_FAILURE,
    KIND_OUTPUTS,
    KIND_REBUILT_BASE_STATE,
    KIND_REFRESH_SUCCESS,
    KIND_SECRETS_MANAGER,
    KIND_SNIPPETS,
    KIND_SUCCESS,
    KIND_WRITE,
    UNKNOWN_PROVIDER_ID,
    JournalError,
    JournalReplayer,
    walks_the_state,
)

NOW = "2024-05-01T10:00:00Z"
PET_TYPE = "random:index/randomPet:RandomPet"
STACK = "urn:pulumi:dev::demo::pulumi:pulumi:Stack::demo-dev"
PROVIDER = "urn:pulumi:dev::demo::pulumi:providers:random::default"


def urn(name: str, type_: str = PET_TYPE) -> str:
    return f"urn:pulumi:dev::demo::{type_}::{name}"


def stack(**fields: Any) -> dict[str, Any]:
    return {"urn": STACK, "custom": False, "type": "pulumi:pulumi:Stack", **fields}


def pet(name: str, **fields: Any) -> dict[str, Any]:
    res = {"urn": urn(name), "custom": True, "id": f"id-{name}", "type": PET_TYPE}
    res.update(fields)
    return res


def deployment(*resources: dict[str, Any], **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "", "version": ""},
        "metadata": {},
        "resources": list(resources),
    }
    base.update(fields)
    return base


def entry(
    seq: int,
    kind: int,
    op: int = 0,
    remove_old: int | None = None,
    remove_new: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "version": 1,
        "kind": kind,
        "sequenceID": seq,
        "operationID": op,
        "removeOld": remove_old,
        "removeNew": remove_new,
        **extra,
    }


def begin(seq: int, op: int, op_type: str | None = None, res: Any = None) -> dict[str, Any]:
    if op_type is None:
        return entry(seq, KIND_BEGIN, op)
    return entry(seq, KIND_BEGIN, op, operation={"resource": res, "type": op_type})


def replay(base: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    replayer = JournalReplayer(base)
    replayer.add(entries)
    return replayer.generate(now_iso=NOW, engine_version="")


def resources(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = result["deployment"].get("resources", [])
    return out


def names(result: dict[str, Any]) -> list[str]:
    return [r["urn"].rsplit("::", 1)[1] for r in resources(result)]


# The example batch of §6.3.
SERVICE_PROVIDER = {
    "type": "service",
    "state": {"url": "https://api.example", "owner": "acme", "project": "demo", "stack": "dev"},
}
EXAMPLE_BATCH = [
    entry(1, KIND_SECRETS_MANAGER, secretsProvider=SERVICE_PROVIDER),
    begin(2, 1),
    entry(3, KIND_SUCCESS, 1, remove_old=0, state=stack()),
    begin(4, 2, "creating", {"urn": urn("pet"), "custom": True, "type": PET_TYPE}),
    entry(5, KIND_SUCCESS, 2, state=pet("pet", id="able-cat")),
    entry(6, KIND_OUTPUTS, 3, remove_new=1, state=stack(outputs={"name": "able-cat"})),
]


def test_example_batch() -> None:
    result = replay(deployment(stack()), EXAMPLE_BATCH)
    assert result == {
        "version": 3,
        "deployment": {
            "manifest": {"time": NOW, "magic": "", "version": ""},
            "secrets_providers": SERVICE_PROVIDER,
            "resources": [stack(outputs={"name": "able-cat"}), pet("pet", id="able-cat")],
            "metadata": {},
        },
    }


def test_manifest_magic_is_sha256_of_engine_version() -> None:
    replayer = JournalReplayer(deployment())
    manifest = replayer.generate(now_iso=NOW, engine_version="3.259.0")["deployment"]["manifest"]
    assert manifest == {
        "time": NOW,
        "magic": hashlib.sha256(b"3.259.0").hexdigest(),
        "version": "3.259.0",
    }


def test_empty_deployment_with_null_resources() -> None:
    base = {"manifest": {"time": NOW, "magic": "", "version": ""}, "resources": None}
    result = JournalReplayer(base).generate(now_iso=NOW, engine_version="")
    assert result == {
        "version": 3,
        "deployment": {"manifest": {"time": NOW, "magic": "", "version": ""}, "metadata": {}},
    }


def test_create_then_crash_leaves_pending_operation() -> None:
    goal = {"urn": urn("b"), "custom": True, "type": PET_TYPE}
    entries = [begin(1, 1, "creating", goal)]
    result = replay(deployment(stack()), entries)
    assert names(result) == ["demo-dev"]
    assert result["deployment"]["pending_operations"] == [{"resource": goal, "type": "creating"}]
    entries.append(entry(2, KIND_SUCCESS, 1, state=pet("b")))
    result = replay(deployment(stack()), entries)
    assert resources(result) == [pet("b"), stack()]
    assert "pending_operations" not in result["deployment"]


def test_same_and_update_move_resources_to_the_front() -> None:
    base = deployment(stack(), pet("a"), pet("b"), pet("c"))
    entries = [
        begin(1, 1),
        entry(2, KIND_SUCCESS, 1, remove_old=0, state=stack()),
        begin(3, 2, "updating", pet("c", inputs={"x": 2})),
        entry(4, KIND_SUCCESS, 2, remove_old=3, state=pet("c", inputs={"x": 2})),
    ]
    result = replay(base, entries)
    assert resources(result) == [stack(), pet("c", inputs={"x": 2}), pet("a"), pet("b")]


def test_unchanged_resources_share_the_base_copy() -> None:
    # A step that changes nothing sends the resource again: the update keeps the base's
    # copy (one copy of a large stack in memory, not two); a changed one keeps its own.
    base = deployment(stack(), pet("a", outputs={"p": "x" * 1000}), pet("b"))
    entries = [
        begin(1, 1),
        entry(2, KIND_SUCCESS, 1, remove_old=1, state=pet("a", outputs={"p": "x" * 1000})),
        begin(3, 2),
        entry(4, KIND_SUCCESS, 2, remove_old=2, state=pet("b", inputs={"x": 1})),
        begin(5, 3),
        entry(6, KIND_REFRESH_SUCCESS, 3, remove_old=0, state=stack(), isRefresh=True),
    ]
    result = resources(replay(base, entries))
    assert result == [pet("a", outputs={"p": "x" * 1000}), pet("b", inputs={"x": 1}), stack()]
    assert result[0] is base["resources"][1]
    assert result[1] is not base["resources"][2]
    assert result[2] is base["resources"][0]


def test_delete_removes_without_state() -> None:
    base = deployment(stack(), pet("a"), pet("b"))
    entries = [begin(1, 1, "deleting", pet("a")), entry(2, KIND_SUCCESS, 1, remove_old=1)]
    assert names(replay(base, entries)) == ["demo-dev", "b"]


def test_failure_ignores_its_state() -> None:
    base = deployment(stack(), pet("a"))
    entries = [
        begin(1, 1, "updating", pet("a", inputs={"x": 1})),
        entry(2, KIND_FAILURE, 1, remove_old=1, state=pet("a", inputs={"x": 1})),
        begin(3, 2, "creating", pet("b")),
        entry(4, KIND_FAILURE, 2, state=pet("b")),
    ]
    result = replay(base, entries)
    assert resources(result) == [stack(), pet("a")]
    assert "pending_operations" not in result["deployment"]


def test_create_before_delete_replace() -> None:
    base = deployment(stack(), pet("a"))
    entries = [
        begin(1, 1, "creating", pet("a", id="")),
        entry(2, KIND_SUCCESS, 1, deleteOld=1, state=pet("a", id="new")),
    ]
    # Between the create and the delete both copies exist, the old one marked for deletion.
    assert resources(replay(base, entries)) == [pet("a", id="new"), stack(), pet("a", delete=True)]
    entries += [
        begin(3, 3, "deleting", pet("a")),
        entry(4, KIND_SUCCESS, 3, remove_old=1),
    ]
    assert resources(replay(base, entries)) == [pet("a", id="new"), stack()]


def test_create_before_delete_of_a_new_resource_uses_delete_new() -> None:
    base = deployment(stack())
    entries = [
        begin(1, 1, "creating", pet("a")),
        entry(2, KIND_SUCCESS, 1, state=pet("a")),
        begin(3, 2, "creating", pet("a", id="")),
        entry(4, KIND_SUCCESS, 2, deleteNew=1, state=pet("a", id="second")),
    ]
    assert resources(replay(base, entries)) == [
        pet("a", delete=True),
        pet("a", id="second"),
        stack(),
    ]


def test_delete_before_replace() -> None:
    base = deployment(stack(), pet("a"))
    entries = [
        begin(1, 1, "deleting", pet("a")),
        entry(2, KIND_SUCCESS, 1, pendingReplacementOld=1),
    ]
    # After the delete the old copy stays, flagged, until its replacement exists.
    assert resources(replay(base, entries)) == [stack(), pet("a", pendingReplacement=True)]
    entries += [
        begin(3, 3, "creating", pet("a", id="")),
        entry(4, KIND_SUCCESS, 3, remove_old=1, state=pet("a", id="new")),
    ]
    assert resources(replay(base, entries)) == [pet("a", id="new"), stack()]


def test_pending_replacement_of_a_new_resource() -> None:
    entries = [
        begin(1, 1, "creating", pet("a")),
        entry(2, KIND_SUCCESS, 1, state=pet("a")),
        begin(3, 2, "deleting", pet("a")),
        entry(4, KIND_SUCCESS, 2, pendingReplacementNew=1),
    ]
    assert resources(replay(deployment(), entries)) == [pet("a", pendingReplacement=True)]


def test_remove_new_drops_a_resource_created_earlier() -> None:
    entries = [
        begin(1, 1, "creating", pet("a")),
        entry(2, KIND_SUCCESS, 1, state=pet("a")),
        begin(3, 2, "deleting", pet("a")),
        entry(4, KIND_SUCCESS, 2, remove_new=1),
    ]
    assert resources(replay(deployment(stack()), entries)) == [stack()]


def test_outputs_on_a_base_resource_replace_it_in_place() -> None:
    base = deployment(stack(), pet("a"))
    entries = [
        begin(1, 1, "deleting", pet("a")),
        entry(2, KIND_SUCCESS, 1, pendingReplacementOld=0),
        entry(3, KIND_OUTPUTS, 2, remove_old=0, state=stack(outputs={"n": 1})),
    ]
    # The replacement wins over the flag set on the base copy.
    assert resources(replay(base, entries)) == [stack(outputs={"n": 1}), pet("a")]


def test_outputs_without_state_do_nothing() -> None:
    base = deployment(stack())
    assert resources(replay(base, [entry(1, KIND_OUTPUTS, 1, remove_old=5)])) == [stack()]


def test_read_replaces_previous_copy() -> None:
    base = deployment(stack(), pet("ext", external=True))
    entries = [
        begin(1, 1, "reading", pet("ext", external=True)),
        entry(2, KIND_SUCCESS, 1, remove_old=1, state=pet("ext", external=True, outputs={"v": 2})),
        begin(3, 2, "reading", pet("other", external=True)),
        entry(4, KIND_SUCCESS, 2, state=pet("other", external=True)),
    ]
    assert resources(replay(base, entries)) == [
        pet("ext", external=True, outputs={"v": 2}),
        pet("other", external=True),
        stack(),
    ]


def refresh_base() -> dict[str, Any]:
    a = pet("a")
    b = pet(
        "b",
        parent=urn("a"),
        dependencies=[STACK, urn("a")],
        propertyDependencies={"x": [urn("a")], "y": [STACK], "z": []},
        deletedWith=urn("a"),
        replaceWith=[urn("a")],
    )
    c = pet("c", parent=urn("b"), dependencies=[urn("b")])
    return deployment(stack(), a, b, c)


def test_refresh_rebuilds_dependencies_and_parents() -> None:
    entries = [
        begin(1, 1),
        entry(2, KIND_REFRESH_SUCCESS, 1, remove_old=1, isRefresh=True),
        begin(3, 2),
        entry(4, KIND_REFRESH_SUCCESS, 2, remove_old=3, isRefresh=True, state=pet("c", v=2)),
    ]
    result = replay(refresh_base(), entries)
    # b loses everything pointing at the deleted a; the dangling parent is cleared.
    assert resources(result) == [
        stack(),
        pet("b", dependencies=[STACK], propertyDependencies={"y": [STACK]}),
        pet("c", v=2),
    ]


def test_without_refresh_dangling_references_are_left_alone() -> None:
    entries = [begin(1, 1, "deleting", pet("a")), entry(2, KIND_SUCCESS, 1, remove_old=1)]
    result = replay(refresh_base(), entries)
    assert resources(result)[1] == refresh_base()["resources"][2]


def test_persisted_refresh_is_a_success_with_is_refresh() -> None:
    entries = [
        begin(1, 1, "deleting", pet("a")),
        entry(2, KIND_SUCCESS, 1, remove_old=1),
        begin(3, 2),
        entry(4, KIND_SUCCESS, 2, remove_old=0, isRefresh=True, state=stack(v=1)),
    ]
    result = replay(refresh_base(), entries)
    # A success flagged isRefresh moves the resource to the front and turns on the rebuild.
    assert resources(result)[:2] == [
        stack(v=1),
        pet("b", dependencies=[STACK], propertyDependencies={"y": [STACK]}),
    ]


def test_refresh_rebuild_checks_parents_against_the_whole_list() -> None:
    entries = [
        begin(1, 1),
        entry(2, KIND_SUCCESS, 1, remove_old=3, isRefresh=True, state=pet("c", parent=urn("b"))),
    ]
    # c now precedes its parent b; the CLI only clears parents that are missing entirely.
    assert resources(replay(refresh_base(), entries))[0] == pet("c", parent=urn("b"))


def test_refresh_of_a_new_resource() -> None:
    entries = [
        begin(1, 1, "creating", pet("a")),
        entry(2, KIND_SUCCESS, 1, state=pet("a")),
        begin(3, 2, "creating", pet("b")),
        entry(4, KIND_SUCCESS, 2, state=pet("b", dependencies=[urn("a")])),
        begin(5, 3),
        entry(6, KIND_REFRESH_SUCCESS, 3, remove_new=2, state=pet("b", v=1)),
        begin(7, 4),
        entry(8, KIND_REFRESH_SUCCESS, 4, remove_new=1),
    ]
    assert resources(replay(deployment(), entries)) == [pet("b", v=1)]


def test_write_replaces_the_base() -> None:
    base = deployment(stack(), pet("a"))
    migrated = deployment(pet("z"), stack(), pet("a", migrated=True))
    entries = [
        entry(1, KIND_WRITE, newSnapshot=migrated),
        begin(2, 1),
        entry(3, KIND_SUCCESS, 1, remove_old=1, state=stack()),
    ]
    assert resources(replay(base, entries)) == [stack(), pet("z"), pet("a", migrated=True)]


@pytest.mark.parametrize(
    ("current", "incoming", "expected"),
    [
        (None, {"type": "passphrase", "state": {"salt": "x"}}, "incoming"),
        ({"type": "passphrase", "state": {"salt": "x"}}, {"type": "passphrase"}, "incoming"),
        ({"type": "passphrase", "state": {"salt": "x"}}, {"type": "service"}, "incoming"),
        (
            {"type": "passphrase", "state": {"salt": "x"}},
            {"type": "passphrase", "state": {"salt": "x"}},
            "current",
        ),
    ],
)
def test_secrets_manager(
    current: dict[str, Any] | None, incoming: dict[str, Any], expected: str
) -> None:
    base = deployment() if current is None else deployment(secrets_providers=current)
    result = replay(base, [entry(1, KIND_SECRETS_MANAGER, secretsProvider=incoming)])
    provider = result["deployment"]["secrets_providers"]
    assert provider is (incoming if expected == "incoming" else current)


def test_rebuilt_base_state_resets_indices() -> None:
    base = deployment(stack(), pet("a"), pet("b", dependencies=[urn("a")]))
    entries = [
        begin(1, 1),
        entry(2, KIND_REFRESH_SUCCESS, 1, remove_old=1, isRefresh=True),
        begin(3, 2),
        entry(4, KIND_REFRESH_SUCCESS, 2, remove_old=2, isRefresh=True, state=pet("b", v=1)),
        entry(5, KIND_REBUILT_BASE_STATE),
        # Indices now refer to the rebuilt base [stack, b].
        begin(6, 3),
        entry(7, KIND_SUCCESS, 3, remove_old=0, state=stack()),
        begin(8, 4, "updating", pet("b", v=2)),
        entry(9, KIND_SUCCESS, 4, remove_old=1, state=pet("b", v=2)),
    ]
    assert resources(replay(base, entries)) == [stack(), pet("b", v=2)]


def test_rebuilt_base_state_forgets_earlier_operations() -> None:
    replayer = JournalReplayer(deployment(stack()))
    replayer.add(
        [
            begin(1, 1),
            entry(2, KIND_SUCCESS, 1, isRefresh=True, remove_old=0, state=stack(v=1)),
            entry(3, KIND_REBUILT_BASE_STATE),
        ]
    )
    # Operation 1's resource is now base resource 0, no longer a "new" one.
    with pytest.raises(JournalError, match="operation 1"):
        replayer.add([entry(4, KIND_OUTPUTS, 2, remove_new=1, state=stack(v=2))])
    replayer.add([entry(4, KIND_OUTPUTS, 2, remove_old=0, state=stack(v=2))])
    assert resources(replayer.generate(now_iso=NOW, engine_version="")) == [stack(v=2)]


def test_rebuilt_base_state_keeps_only_interrupted_creates() -> None:
    creating = {"resource": pet("x"), "type": "creating"}
    updating = {"resource": pet("y"), "type": "updating"}
    base = deployment(stack(), pending_operations=[updating, creating])
    entries = [
        begin(1, 1, "creating", pet("c")),
        begin(2, 2, "updating", pet("u")),
        entry(3, KIND_REBUILT_BASE_STATE),
    ]
    result = replay(base, entries)
    assert result["deployment"]["pending_operations"] == [
        {"resource": pet("c"), "type": "creating"},
        creating,
    ]


def test_rebuilt_base_state_keeps_flags_sticky() -> None:
    entries = [
        entry(1, KIND_BEGIN, 1, requiresByteString=True),
        entry(2, KIND_REFRESH_SUCCESS, 1, remove_old=1),
        entry(3, KIND_REBUILT_BASE_STATE),
        begin(4, 2, "creating", pet("d")),
        entry(5, KIND_SUCCESS, 2, state=pet("d", dependencies=[urn("gone")])),
    ]
    result = replay(deployment(stack(), pet("a"), pet("b", dependencies=[urn("a")])), entries)
    assert result["features"] == ["byteString"]
    # Still "refreshed": the dependency on a resource that is not there is pruned.
    assert resources(result) == [pet("d"), stack(), pet("b")]


def test_extensions_from_entries_and_base() -> None:
    mine = {"name": "ext", "version": "1.0.0", "value": "AA=="}
    theirs = {"name": "ext", "version": "0.9.0", "value": "AQ=="}
    base = deployment(extensions={"shared": theirs})
    entries = [
        entry(1, KIND_EXTENSION_PARAMETERIZE, 1, extensionRef="mine", extension=mine),
        entry(2, KIND_EXTENSION_PARAMETERIZE, 2, extensionRef="shared", extension=mine),
    ]
    result = replay(base, entries)
    # Extensions alone declare no feature; the base wins on a shared key.
    assert result["version"] == 3
    assert result["deployment"]["extensions"] == {"mine": mine, "shared": theirs}


def test_snippets_set_and_clear() -> None:
    snippet = {"uuid": "u1", "name": "n", "type": "t", "code": "", "descriptor": {"name": "p"}}
    result = replay(deployment(), [entry(1, KIND_SNIPPETS, snippets=[snippet])])
    assert result["deployment"]["snippets"] == [snippet]
    assert (result["version"], result["features"]) == (4, ["snippets-prototype"])
    base = deployment(snippets=[snippet])
    result = replay(base, [entry(1, KIND_SNIPPETS)])
    assert "snippets" not in result["deployment"]
    assert result["version"] == 3


def test_requires_byte_string_declares_the_feature() -> None:
    entries = [begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("a"), requiresByteString=True)]
    result = replay(deployment(), entries)
    assert (result["version"], result["features"]) == (4, ["byteString"])


@pytest.mark.parametrize(
    ("fields", "feature"),
    [
        ({"taint": True}, "taint"),
        ({"viewOf": urn("a")}, "views"),
        ({"resourceHooks": {"before_create": ["h"]}}, "hooks"),
        ({"refreshBeforeUpdate": True}, "refreshBeforeUpdate"),
        ({"replaceWith": [urn("a")]}, "replaceWith"),
        ({"extensionRef": "ref"}, "extensionParameterization"),
        ({"snippetID": "s1"}, "snippets-prototype"),
        ({"taint": False, "resourceHooks": {}, "replaceWith": [], "viewOf": ""}, None),
    ],
)
def test_features_from_resources(fields: dict[str, Any], feature: str | None) -> None:
    for where in ("base", "new", "pending"):
        base = deployment(pet("a"))
        entries: list[dict[str, Any]] = []
        if where == "base":
            base["resources"].append(pet("b", **fields))
        elif where == "new":
            entries = [begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("b", **fields))]
        else:
            entries = [begin(1, 1, "creating", pet("b", **fields))]
        result = replay(base, entries)
        if feature is None:
            assert result["version"] == 3 and "features" not in result
        else:
            assert (result["version"], result["features"]) == (4, [feature]), where


def test_features_are_sorted() -> None:
    base = deployment(pet("a", taint=True, refreshBeforeUpdate=True))
    result = replay(base, [entry(1, KIND_BEGIN, 1, requiresByteString=True)])
    assert result["features"] == ["byteString", "refreshBeforeUpdate", "taint"]


def test_pending_operations_from_open_begins_and_base_creates() -> None:
    base_ops = [
        {"resource": pet("p1"), "type": "creating"},
        {"resource": pet("p2"), "type": "deleting"},
        {"resource": pet("p3"), "type": "updating"},
    ]
    base = deployment(stack(), pet("d"), pending_operations=base_ops)
    entries = [
        begin(1, 1),  # a same step: no operation
        begin(2, 3, "deleting", pet("d")),
        begin(3, 2, "updating", stack()),
        begin(4, 4, "reading", pet("r")),
        entry(5, KIND_SUCCESS, 4, state=pet("r")),
        begin(6, 5, "importing", pet("i")),
        entry(7, KIND_FAILURE, 5),
    ]
    result = replay(base, entries)
    assert result["deployment"]["pending_operations"] == [
        {"resource": stack(), "type": "updating"},
        {"resource": pet("d"), "type": "deleting"},
        base_ops[0],
    ]


def comp(name: str, type_: str = "my:index:Comp", **fields: Any) -> dict[str, Any]:
    return {"urn": urn(name, type_), "custom": False, "type": type_, **fields}


def test_alias_normalisation() -> None:
    prov_old = "urn:pulumi:dev::demo::pulumi:providers:random::old"
    prov_new = "urn:pulumi:dev::demo::pulumi:providers:random::new"
    old_parent = urn("oldp", "my:index:Old")
    new_parent = urn("newp", "my:index:Comp")
    child_old = urn("kid", f"my:index:Old${PET_TYPE}")
    child_new = urn("kid", f"my:index:Comp${PET_TYPE}")
    snippet = {"uuid": "u", "name": "n", "type": "t", "code": "", "descriptor": {"name": "p"}}
    base = deployment(
        {"urn": prov_new, "custom": True, "id": "pid", "type": "pulumi:providers:random"},
        comp("newp", aliases=[old_parent, old_parent]),
        pet("kid", urn=child_old, parent=old_parent, provider=f"{prov_old}::pid"),
        pet(
            "user",
            dependencies=[child_old, STACK],
            propertyDependencies={"x": [old_parent], "y": []},
            deletedWith=child_old,
            viewOf=old_parent,
            aliases=[urn("olduser")],
            provider=f"{prov_new}::",
        ),
        snippets=[{**snippet, "references": {"a": old_parent, "b": STACK}}],
    )
    base["resources"][0]["aliases"] = [prov_old]
    result = replay(base, [])
    res = resources(result)
    assert [r["urn"] for r in res] == [prov_new, new_parent, child_new, urn("user")]
    assert all("aliases" not in r for r in res)
    assert res[2]["parent"] == new_parent
    assert res[2]["provider"] == f"{prov_new}::pid"
    assert res[3]["dependencies"] == [child_new, STACK]
    assert res[3]["propertyDependencies"] == {"x": [new_parent], "y": []}
    assert res[3]["deletedWith"] == child_new
    assert res[3]["viewOf"] == new_parent
    assert res[3]["provider"] == f"{prov_new}::{UNKNOWN_PROVIDER_ID}"
    assert result["deployment"]["snippets"][0]["references"] == {"a": new_parent, "b": STACK}
    # The base itself is untouched.
    assert base["resources"][1]["aliases"] == [old_parent, old_parent]


def test_child_of_an_aliased_stack_parent_keeps_its_urn() -> None:
    kid = pet("kid", parent="urn:pulumi:dev::demo::pulumi:pulumi:Stack::old-dev")
    base = deployment(stack(aliases=["urn:pulumi:dev::demo::pulumi:pulumi:Stack::old-dev"]), kid)
    res = resources(replay(base, []))
    assert res[1] == pet("kid", parent=STACK)


def test_conflicting_aliases_are_an_error() -> None:
    base = deployment(pet("a", aliases=[urn("old")]), pet("b", aliases=[urn("old")]))
    with pytest.raises(JournalError, match="same alias"):
        JournalReplayer(base).generate(now_iso=NOW, engine_version="")


def test_rebuilt_base_state_with_conflicting_aliases_is_rejected() -> None:
    base = deployment(pet("a", aliases=[urn("old")]), pet("b", aliases=[urn("old")]))
    replayer = JournalReplayer(base)
    with pytest.raises(JournalError, match="same alias"):
        replayer.add([entry(1, KIND_REBUILT_BASE_STATE)])
    assert replayer.applied_through == 0 and replayer.entry_count == 0


def test_duplicates_and_out_of_order_arrival_match_in_order() -> None:
    base = deployment(stack())
    expected = replay(base, EXAMPLE_BATCH)
    replayer = JournalReplayer(base)
    b = EXAMPLE_BATCH
    replayer.add([b[5], b[3]])
    assert replayer.applied_through == 0 and replayer.pending_count == 2
    replayer.add([b[0], b[0], b[3]])
    assert replayer.applied_through == 1
    replayer.add([b[2], b[4], b[1], b[5]])
    assert replayer.applied_through == 6 and replayer.entry_count == 6
    replayer.add(b)  # a whole retried batch
    assert replayer.entry_count == 6
    assert replayer.generate(now_iso=NOW, engine_version="") == expected


def test_first_copy_of_a_sequence_id_wins() -> None:
    replayer = JournalReplayer(deployment())
    replayer.add([begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("a"))])
    replayer.add([entry(2, KIND_SUCCESS, 1, state=pet("other"))])
    assert names(replayer.generate(now_iso=NOW, engine_version="")) == ["a"]


def test_generate_twice_and_does_not_mutate() -> None:
    base = refresh_base()
    entries = [
        *EXAMPLE_BATCH[:2],
        entry(3, KIND_SUCCESS, 1, remove_old=0, state=stack(aliases=[urn("x")])),
        begin(4, 2, "deleting", pet("a")),
        entry(5, KIND_SUCCESS, 2, pendingReplacementOld=1),
        begin(6, 3),
        entry(7, KIND_REFRESH_SUCCESS, 3, remove_old=3, isRefresh=True),
        entry(9, KIND_SUCCESS, 4, deleteOld=2),
    ]
    base_copy, entries_copy = copy.deepcopy(base), copy.deepcopy(entries)
    replayer = JournalReplayer(base)
    replayer.add(entries)
    first = replayer.generate(now_iso=NOW, engine_version="v")
    first_copy = copy.deepcopy(first)
    second = replayer.generate(now_iso=NOW, engine_version="v")
    assert first == second == first_copy
    assert base == base_copy and entries == entries_copy
    assert replayer.pending_count == 1


def test_generated_result_is_not_changed_by_later_entries() -> None:
    replayer = JournalReplayer(deployment(stack()))
    replayer.add([begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("a"))])
    first = replayer.generate(now_iso=NOW, engine_version="")
    first_copy = copy.deepcopy(first)
    replayer.add(
        [
            begin(3, 2),
            entry(4, KIND_SUCCESS, 2, deleteNew=1, deleteOld=0, state=pet("a", id="x")),
            entry(5, KIND_SNIPPETS, snippets=[]),
            entry(6, KIND_OUTPUTS, 3, remove_new=2, state=pet("a", id="y")),
        ]
    )
    assert first == first_copy
    assert resources(replayer.generate(now_iso=NOW, engine_version="")) == [
        pet("a", delete=True),
        pet("a", id="y"),
        stack(delete=True),
    ]


def test_generate_before_a_gap_fills() -> None:
    base = deployment(stack(), pet("a"))
    entries = [
        begin(1, 1, "creating", pet("b")),
        entry(2, KIND_SUCCESS, 1, state=pet("b")),
        begin(3, 2, "updating", pet("a", v=1)),
        entry(4, KIND_SUCCESS, 2, remove_old=1, state=pet("a", v=1)),
        begin(5, 3),
        entry(6, KIND_OUTPUTS, 3, remove_new=1, state=pet("b", v=9)),
    ]
    replayer = JournalReplayer(base)
    replayer.add([entries[0], entries[2], entries[3], entries[5]])
    assert (replayer.applied_through, replayer.pending_count) == (1, 3)
    # 3 and 4 apply across the gap; 6 needs operation 1's result (entry 2) and is left out.
    partial = replayer.generate(now_iso=NOW, engine_version="")
    assert resources(partial) == [pet("a", v=1), stack()]
    assert partial["deployment"]["pending_operations"] == [
        {"resource": pet("b"), "type": "creating"}
    ]
    assert (replayer.applied_through, replayer.pending_count) == (1, 3)
    replayer.add([entries[1], entries[4]])
    assert (replayer.applied_through, replayer.pending_count) == (6, 0)
    assert replayer.generate(now_iso=NOW, engine_version="") == replay(base, entries)


def test_add_accepts_any_iterable() -> None:
    replayer = JournalReplayer(deployment())
    replayer.add(e for e in [begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("a"))])
    assert replayer.applied_through == 2


BAD_ENTRIES: list[tuple[Any, str]] = [
    ("not an object", "JSON object"),
    ({"kind": 0, "operationID": 1}, "missing sequenceID"),
    (entry(3, 0, 1) | {"sequenceID": "3"}, "sequenceID must be an integer"),
    (entry(3, 0, 1) | {"sequenceID": 0}, "at least 1"),
    (entry(3, 0, 1) | {"sequenceID": True}, "sequenceID must be an integer"),
    ({"sequenceID": 3, "operationID": 1}, "missing kind"),
    (entry(3, 0, 1) | {"kind": 1.0}, "kind must be an integer"),
    (entry(3, 10, 1), "unknown kind 10"),
    (entry(3, -1, 1), "unknown kind -1"),
    ({"sequenceID": 3, "kind": 0}, "missing operationID"),
    (entry(3, 0, 1) | {"operationID": -2}, "negative"),
    (entry(3, KIND_SUCCESS, 1) | {"removeOld": "0"}, "removeOld must be an integer"),
    (entry(3, KIND_SUCCESS, 1, remove_old=2), "removeOld 2 is outside"),
    (entry(3, KIND_SUCCESS, 1, remove_old=-1), "removeOld -1 is outside"),
    (entry(3, KIND_SUCCESS, 1, deleteOld=7), "deleteOld 7 is outside"),
    (entry(3, KIND_SUCCESS, 1, pendingReplacementOld=7), "pendingReplacementOld 7"),
    (entry(3, KIND_REFRESH_SUCCESS, 1, remove_old=2), "removeOld 2 is outside"),
    (entry(3, KIND_OUTPUTS, 1, remove_old=2, state=pet("a")), "removeOld 2 is outside"),
    (entry(3, KIND_SUCCESS, 2, remove_new=5), "removeNew refers to operation 5"),
    (entry(3, KIND_SUCCESS, 2, deleteNew=5, state=pet("a")), "deleteNew refers to operation 5"),
    (entry(3, KIND_SUCCESS, 2, pendingReplacementNew=5), "pendingReplacementNew refers"),
    (entry(3, KIND_REFRESH_SUCCESS, 2, remove_new=2, state=pet("a")), "removeNew refers"),
    (entry(3, KIND_OUTPUTS, 2, remove_new=9, state=pet("a")), "removeNew refers"),
    (entry(3, KIND_SUCCESS, 2, state=[]), "state must be an object"),
    (entry(3, KIND_SUCCESS, 2, state={"urn": urn("a")}), "non-empty string 'type'"),
    (entry(3, KIND_SUCCESS, 2, state=pet("a", dependencies="x")), "dependencies must be"),
    (entry(3, KIND_SUCCESS, 2, state=pet("a", parent=1)), "parent must be a string"),
    (entry(3, KIND_SUCCESS, 2, state=pet("a", propertyDependencies=[])), "propertyDep"),
    (entry(3, KIND_SUCCESS, 2, state=pet("a", propertyDependencies={"p": [1]})), "propertyDep"),
    (entry(3, KIND_BEGIN, 2, operation={"type": "creating"}), "operation.resource"),
    (entry(3, KIND_BEGIN, 2, operation={"resource": pet("a")}), "operation.type"),
    (entry(3, KIND_SUCCESS, 2, isRefresh="yes"), "isRefresh must be a boolean"),
    (entry(3, KIND_WRITE), "needs newSnapshot"),
    (entry(3, KIND_WRITE, newSnapshot={"resources": {}}), "resources must be an array"),
    (entry(3, KIND_SECRETS_MANAGER), "needs secretsProvider"),
    (entry(3, KIND_SECRETS_MANAGER, secretsProvider={"state": {}}), "secretsProvider.type"),
    (entry(3, KIND_EXTENSION_PARAMETERIZE, extensionRef="r"), "needs extensionRef"),
    (entry(3, KIND_SNIPPETS, snippets={}), "snippets must be an array"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ENTRIES)
def test_bad_entries_are_rejected_without_changes(bad: Any, message: str) -> None:
    base = deployment(stack(), pet("a"))
    good = [begin(1, 1, "creating", pet("b")), entry(2, KIND_SUCCESS, 1, state=pet("b"))]
    replayer = JournalReplayer(base)
    replayer.add(good[:1])
    before = replayer.generate(now_iso=NOW, engine_version="")
    # The good entry ahead of the bad one in the batch is rolled back too.
    with pytest.raises(JournalError, match=message):
        replayer.add([good[1], bad])
    assert (replayer.applied_through, replayer.entry_count) == (1, 1)
    assert replayer.generate(now_iso=NOW, engine_version="") == before
    replayer.add(good)
    assert names(replayer.generate(now_iso=NOW, engine_version="")) == ["b", "demo-dev", "a"]


def test_rejected_batch_restores_everything_it_touched() -> None:
    base = deployment(stack(), pet("a"), pet("b"))
    replayer = JournalReplayer(base)
    replayer.add([begin(1, 1), entry(2, KIND_SUCCESS, 1, state=pet("n"))])
    before = replayer.generate(now_iso=NOW, engine_version="")
    batch = [
        entry(3, KIND_SECRETS_MANAGER, secretsProvider={"type": "x"}),
        begin(4, 2, "deleting", pet("a")),
        entry(5, KIND_SUCCESS, 2, pendingReplacementOld=1, deleteNew=1, remove_new=1),
        entry(6, KIND_REFRESH_SUCCESS, 3, remove_old=2, requiresByteString=True),
        entry(7, KIND_OUTPUTS, 4, remove_old=0, state=stack(outputs={"a": 1})),
        entry(8, KIND_EXTENSION_PARAMETERIZE, extensionRef="r", extension={}),
        entry(9, KIND_REBUILT_BASE_STATE),
        entry(10, KIND_SUCCESS, 5, remove_old=9),  # the rebuilt base has only 1 resource
    ]
    with pytest.raises(JournalError, match="removeOld 9"):
        replayer.add(batch)
    assert replayer.applied_through == 2
    assert replayer.generate(now_iso=NOW, engine_version="") == before
    replayer.add(batch[:-1])
    assert replayer.applied_through == 9


def test_bad_entry_waiting_behind_a_gap_rejects_the_batch_that_fills_it() -> None:
    replayer = JournalReplayer(deployment(stack()))
    replayer.add([entry(3, KIND_SUCCESS, 1, remove_old=4)])  # only checkable once applied
    assert replayer.pending_count == 1
    # Meanwhile generate leaves it out.
    assert resources(replayer.generate(now_iso=NOW, engine_version="")) == [stack()]
    with pytest.raises(JournalError, match="removeOld 4"):
        replayer.add([begin(1, 1), begin(2, 2)])
    assert (replayer.applied_through, replayer.pending_count) == (0, 1)


def test_bad_base_is_rejected() -> None:
    with pytest.raises(JournalError):
        JournalReplayer({"resources": {}})
    with pytest.raises(JournalError):
        JournalReplayer([])  # type: ignore[arg-type]


def test_entries_that_walk_the_whole_state_are_told_apart() -> None:
    # These go to the CPU pool whatever their size; the rest of a small batch stays inline.
    assert walks_the_state(entry(1, KIND_REBUILT_BASE_STATE))
    assert walks_the_state(entry(1, KIND_WRITE, newSnapshot=deployment()))
    assert walks_the_state(entry(2, KIND_SUCCESS, 1, state=pet("a", aliases=[urn("b")])))
    assert walks_the_state(begin(1, 1, "creating", pet("a", aliases=[urn("b")])))
    assert not walks_the_state(entry(2, KIND_SUCCESS, 1, state=pet("a")))
    assert not walks_the_state(begin(1, 1, "creating", pet("a")))
    assert not walks_the_state("not an entry")
