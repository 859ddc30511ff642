"""Inline Pulumi programs with a dynamic provider, for the Automation API tests.

The provider class lives at module level of an importable module, so dill pickles it *by
reference*: the provider process (`pulumi-resource-pulumi-python`, i.e.
`python -m pulumi.dynamic`) imports this module again, which needs the repository root on its
PYTHONPATH. The provider *instance* state is pickled by value, so `padding` makes every
serialized provider (stored by the engine as a secret input and output of each resource)
about that many bytes larger: with 200 resources and 8 KB each, the CLI's batch-decrypt of
the checkpoint is well over 1 MiB.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import pulumi
from pulumi.dynamic import (
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

PROVIDER_KEY = "__provider"
INPUT_KEYS = ("label", "value")
SECRET_OUTPUT = "s3cr3t-output"

# pulumi.dynamic.serialize_provider (SDK 3.259.0) patches pickle._Pickler._batch_setitems with
# a wrapper around the *current* one and never restores it: every dynamic resource registered
# in a process adds a stack frame to each dict pickled afterwards, and after about 977
# resources pickling raises RecursionError ("maximum recursion depth exceeded"). Inline
# programs all run in the test process, so every program starts by undoing the patches.
_PICKLER_ORIGINALS = {
    name: pickle._Pickler.__dict__[name] for name in ("_batch_setitems", "save_dict")
}


def undo_sdk_pickler_patches() -> None:
    for name, original in _PICKLER_ORIGINALS.items():
        setattr(pickle._Pickler, name, original)


class EchoProvider(ResourceProvider):
    """Create returns an id derived from the inputs and echoes them back with extra outputs.

    `fail_on`: labels whose create raises (to make an update fail part way).
    """

    def __init__(self, padding: int = 0, fail_on: Sequence[str] = ()) -> None:
        super().__init__()
        self.padding = "p" * padding
        self.fail_on = tuple(fail_on)

    def _outputs(self, props: dict[str, Any]) -> dict[str, Any]:
        label = str(props["label"])
        value = str(props["value"])
        return {
            "label": label,
            "value": value,
            "echo": f"{label}:{value}",
            "length": len(value),
        }

    def create(self, props: dict[str, Any]) -> CreateResult:
        label = str(props["label"])
        if label in self.fail_on:
            raise RuntimeError(f"EchoProvider: create of {label!r} fails on purpose")
        digest = hashlib.sha256(f"{label}\0{props['value']}".encode()).hexdigest()[:12]
        return CreateResult(id_=f"echo-{label}-{digest}", outs=self._outputs(props))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [key for key in INPUT_KEYS if olds.get(key) != news.get(key)]
        return DiffResult(changes=bool(changed))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs=self._outputs(news))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return ReadResult(id_=id_, outs=props)

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        return None


class Echo(Resource):
    """A dynamic resource served by EchoProvider."""

    label: pulumi.Output[str]
    value: pulumi.Output[str]
    echo: pulumi.Output[str]
    length: pulumi.Output[int]

    def __init__(
        self,
        name: str,
        value: pulumi.Input[str],
        provider: EchoProvider,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props: dict[str, Any] = {"label": name, "value": value, "echo": None, "length": None}
        super().__init__(provider, name, props, opts)


class Group(pulumi.ComponentResource):
    """A component parenting two Echo children, the second depending on the first."""

    def __init__(
        self, name: str, provider: EchoProvider, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("pulumidtest:index:Group", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.first = Echo(f"{name}-first", "one", provider, child)
        self.second = Echo(
            f"{name}-second",
            self.first.echo,
            provider,
            pulumi.ResourceOptions(parent=self, depends_on=[self.first]),
        )
        self.register_outputs({"second": self.second.echo})


def mixed_program() -> None:
    """Top-level resources, a component with children, dependencies and secrets.

    Requires the stack config secret `pw`. Exports `secret` (a secret output), `pw_value`
    and `pw_echo` (outputs of a resource fed the config secret) and plain outputs.
    """
    undo_sdk_pickler_patches()
    provider = EchoProvider()
    password = pulumi.Config().require_secret("pw")
    root = Echo("root", "hello", provider)
    group = Group("group", provider, pulumi.ResourceOptions(depends_on=[root]))
    leaf = Echo("leaf", root.echo, provider, pulumi.ResourceOptions(parent=group))
    # The engine marks an output secret when the input of the same name was; `echo` is derived,
    # so it is declared secret explicitly.
    vault = Echo(
        "vault", password, provider, pulumi.ResourceOptions(additional_secret_outputs=["echo"])
    )
    pulumi.export("root_id", root.id)
    pulumi.export("root_echo", root.echo)
    pulumi.export("leaf_echo", leaf.echo)
    pulumi.export("second_echo", group.second.echo)
    pulumi.export("secret", pulumi.Output.secret(SECRET_OUTPUT))
    pulumi.export("pw_echo", vault.echo)
    pulumi.export("pw_value", vault.value)


def many_program(count: int, padding: int) -> Callable[[], None]:
    """`count` independent Echo resources, each with a provider padded by `padding` bytes."""

    def program() -> None:
        undo_sdk_pickler_patches()
        provider = EchoProvider(padding=padding)
        for index in range(count):
            Echo(f"item-{index:04d}", f"value-{index}", provider)
        pulumi.export("count", count)

    return program


def chain_program(count: int, fail_on: Sequence[str]) -> Callable[[], None]:
    """`count` Echo resources in a dependency chain; creates of `fail_on` names raise."""

    def program() -> None:
        undo_sdk_pickler_patches()
        provider = EchoProvider(fail_on=fail_on)
        previous: Echo | None = None
        for index in range(count):
            value: pulumi.Input[str] = "start" if previous is None else previous.echo
            opts = pulumi.ResourceOptions(depends_on=[previous] if previous else None)
            previous = Echo(f"link-{index}", value, provider, opts)

    return program
