from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pulumid.engine.rename import (
    SIG_KEY,
    SIG_RESOURCE_REF,
    SIG_SECRET,
    rename_deployment,
    rename_urn,
)

PROVIDER_ID = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def urn(stack: str, project: str, qualified_type: str, name: str) -> str:
    return f"urn:pulumi:{stack}::{project}::{qualified_type}::{name}"


def make_deployment(project: str = "web", stack: str = "dev") -> dict[str, Any]:
    stack_urn = urn(stack, project, "pulumi:pulumi:Stack", f"{project}-{stack}")
    provider_urn = urn(stack, project, "pulumi:providers:pulumidtest", "default")
    comp_urn = urn(stack, project, "my:index:Component", "comp::with::colons")
    child_urn = urn(stack, project, "my:index:Component$pulumidtest:index:Thing", "child")
    other_urn = urn(stack, project, "pulumidtest:index:Thing", "other")
    foreign_urn = urn("prod", "shared", "pulumidtest:index:Thing", "elsewhere")
    return {
        "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "abc", "version": "3.0.0"},
        "secrets_providers": {
            "type": "service",
            "state": {
                "url": "https://pulumi.example.com",
                "owner": "acme",
                "project": project,
                "stack": stack,
            },
        },
        "resources": [
            {"urn": stack_urn, "custom": False, "type": "pulumi:pulumi:Stack"},
            {
                "urn": provider_urn,
                "custom": True,
                "id": PROVIDER_ID,
                "type": "pulumi:providers:pulumidtest",
                "parent": stack_urn,
            },
            {
                "urn": comp_urn,
                "custom": False,
                "type": "my:index:Component",
                "parent": stack_urn,
                "aliases": [urn(stack, project, "my:index:Component", "old"), {"name": "x"}],
            },
            {
                "urn": child_urn,
                "custom": True,
                "id": "thing-1",
                "type": "pulumidtest:index:Thing",
                "parent": comp_urn,
                "provider": f"{provider_urn}::{PROVIDER_ID}",
                "dependencies": [other_urn, foreign_urn],
                "propertyDependencies": {"peer": [other_urn], "ext": [foreign_urn]},
                "deletedWith": other_urn,
                "replaceWith": [other_urn],
                "replacementTrigger": other_urn,
                "inputs": {"peer": "other"},
                "outputs": {
                    "peerRef": {
                        SIG_KEY: SIG_RESOURCE_REF,
                        "urn": other_urn,
                        "id": "thing-2",
                        "packageVersion": "1.0.0",
                    },
                    "nested": [
                        {"deep": {SIG_KEY: SIG_RESOURCE_REF, "urn": comp_urn}},
                        {SIG_KEY: SIG_RESOURCE_REF, "urn": foreign_urn},
                    ],
                    "secret": {SIG_KEY: SIG_SECRET, "ciphertext": "opaque"},
                    "plain": "urn-looking but not a ref",
                },
            },
            {
                "urn": other_urn,
                "custom": True,
                "id": "thing-2",
                "type": "pulumidtest:index:Thing",
                "parent": stack_urn,
                "provider": f"{provider_urn}::{PROVIDER_ID}",
                "viewOf": child_urn,
            },
        ],
        "pending_operations": [
            {
                "type": "creating",
                "resource": {
                    "urn": urn(stack, project, "pulumidtest:index:Thing", "pending::one"),
                    "custom": True,
                    "type": "pulumidtest:index:Thing",
                    "parent": stack_urn,
                    "provider": f"{provider_urn}::{PROVIDER_ID}",
                    "dependencies": [other_urn],
                },
            }
        ],
    }


def by_name(deployment: dict[str, Any], suffix: str) -> dict[str, Any]:
    matches = [r for r in deployment["resources"] if r["urn"].endswith("::" + suffix)]
    assert len(matches) == 1
    result: dict[str, Any] = matches[0]
    return result


def test_rename_urn_basics() -> None:
    kwargs = {"old_project": "p", "old_stack": "a", "new_project": "q", "new_stack": "b"}
    assert rename_urn(urn("a", "p", "t:m:T", "n::x::y"), **kwargs) == urn(
        "b", "q", "t:m:T", "n::x::y"
    )
    assert rename_urn(urn("a", "p", "pulumi:pulumi:Stack", "p-a"), **kwargs) == urn(
        "b", "q", "pulumi:pulumi:Stack", "q-b"
    )
    # Other stacks, other projects and non-URNs stay as they are.
    assert rename_urn(urn("c", "p", "t:m:T", "n"), **kwargs) == urn("c", "p", "t:m:T", "n")
    assert rename_urn(urn("a", "r", "t:m:T", "n"), **kwargs) == urn("a", "r", "t:m:T", "n")
    assert rename_urn("not a urn", **kwargs) == "not a urn"
    assert rename_urn("urn:pulumi:a::p", **kwargs) == "urn:pulumi:a::p"


def test_rename_stack_only() -> None:
    original = make_deployment()
    renamed = rename_deployment(
        original,
        old_project="web",
        old_stack="dev",
        new_project="web",
        new_stack="staging",
        owner="acme",
    )
    expected = make_deployment(project="web", stack="staging")
    # Foreign URNs are identical in both, so the whole documents must match.
    assert renamed == expected

    child = by_name(renamed, "child")
    assert child["provider"] == (
        f"urn:pulumi:staging::web::pulumi:providers:pulumidtest::default::{PROVIDER_ID}"
    )
    assert child["dependencies"][1] == "urn:pulumi:prod::shared::pulumidtest:index:Thing::elsewhere"
    assert by_name(renamed, "web-staging")["type"] == "pulumi:pulumi:Stack"
    assert by_name(renamed, "comp::with::colons")["aliases"][1] == {"name": "x"}
    assert renamed["pending_operations"][0]["resource"]["urn"] == (
        "urn:pulumi:staging::web::pulumidtest:index:Thing::pending::one"
    )
    assert renamed["secrets_providers"]["state"] == {
        "url": "https://pulumi.example.com",
        "owner": "acme",
        "project": "web",
        "stack": "staging",
    }


def test_rename_project_and_stack() -> None:
    original = make_deployment()
    renamed = rename_deployment(
        original,
        old_project="web",
        old_stack="dev",
        new_project="site",
        new_stack="prod",
        owner="acme",
    )
    assert renamed == make_deployment(project="site", stack="prod")

    child = by_name(renamed, "child")
    assert child["parent"] == "urn:pulumi:prod::site::my:index:Component::comp::with::colons"
    assert (
        child["outputs"]["peerRef"]["urn"]
        == "urn:pulumi:prod::site::pulumidtest:index:Thing::other"
    )
    assert child["outputs"]["nested"][1]["urn"] == (
        "urn:pulumi:prod::shared::pulumidtest:index:Thing::elsewhere"
    )
    assert child["outputs"]["secret"] == {SIG_KEY: SIG_SECRET, "ciphertext": "opaque"}
    assert by_name(renamed, "site-prod")["urn"] == (
        "urn:pulumi:prod::site::pulumi:pulumi:Stack::site-prod"
    )
    assert by_name(renamed, "other")["viewOf"] == (
        "urn:pulumi:prod::site::my:index:Component$pulumidtest:index:Thing::child"
    )


def test_input_not_mutated() -> None:
    original = make_deployment()
    snapshot = copy.deepcopy(original)
    renamed = rename_deployment(
        original,
        old_project="web",
        old_stack="dev",
        new_project="site",
        new_stack="prod",
        owner="acme",
    )
    assert original == snapshot
    assert renamed != original


def test_other_secrets_provider_untouched() -> None:
    original = make_deployment()
    original["secrets_providers"] = {"type": "passphrase", "state": {"salt": "v1:abc"}}
    renamed = rename_deployment(
        original,
        old_project="web",
        old_stack="dev",
        new_project="web",
        new_stack="qa",
        owner="acme",
    )
    assert renamed["secrets_providers"] == {"type": "passphrase", "state": {"salt": "v1:abc"}}


def test_empty_deployment() -> None:
    renamed = rename_deployment(
        {"manifest": {}}, old_project="a", old_stack="b", new_project="c", new_stack="d", owner="o"
    )
    assert renamed == {"manifest": {}}


@pytest.mark.parametrize("bad", ["", "a::b"])
def test_rejects_unusable_names(bad: str) -> None:
    with pytest.raises(ValueError):
        rename_deployment(
            {}, old_project="a", old_stack="b", new_project="c", new_stack=bad, owner="o"
        )


safe_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
urn_name = st.from_regex(r"[A-Za-z0-9_.:/-]{1,20}", fullmatch=True)
qualified_type = st.sampled_from(
    [
        "pulumidtest:index:Thing",
        "my:index:Component$pulumidtest:index:Thing",
        "aws:s3/bucket:Bucket",
    ]
)


@given(
    old=st.tuples(safe_name, safe_name),
    new=st.tuples(safe_name, safe_name),
    names=st.lists(st.tuples(qualified_type, urn_name), min_size=1, max_size=5),
    foreign=st.tuples(safe_name, safe_name),
)
def test_round_trip(
    old: tuple[str, str],
    new: tuple[str, str],
    names: list[tuple[str, str]],
    foreign: tuple[str, str],
) -> None:
    (old_project, old_stack), (new_project, new_stack) = old, new
    # A URN already in the target stack would be indistinguishable after the rename.
    if foreign in (old, new):
        foreign = ("zz" + foreign[0], foreign[1])

    stack_urn = urn(old_stack, old_project, "pulumi:pulumi:Stack", f"{old_project}-{old_stack}")
    foreign_urn = urn(foreign[1], foreign[0], "pulumidtest:index:Thing", "far")
    resources: list[dict[str, Any]] = [{"urn": stack_urn, "type": "pulumi:pulumi:Stack"}]
    for qtype, name in names:
        resources.append(
            {
                "urn": urn(old_stack, old_project, qtype, name),
                "parent": stack_urn,
                "dependencies": [r["urn"] for r in resources] + [foreign_urn],
                "outputs": {"ref": {SIG_KEY: SIG_RESOURCE_REF, "urn": resources[-1]["urn"]}},
            }
        )
    original = {"resources": resources}

    there = rename_deployment(
        original,
        old_project=old_project,
        old_stack=old_stack,
        new_project=new_project,
        new_stack=new_stack,
        owner="o",
    )
    back = rename_deployment(
        there,
        old_project=new_project,
        old_stack=new_stack,
        new_project=old_project,
        new_stack=old_stack,
        owner="o",
    )
    assert back == original
    for resource in there["resources"]:
        assert resource["urn"].startswith(f"urn:pulumi:{new_stack}::{new_project}::")
