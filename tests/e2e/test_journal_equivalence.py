"""Journal replay and checkpoints give the same state (CLI 3.259.0).

One daemon, one project, two stacks: `ckpt` runs every operation with
PULUMI_DISABLE_JOURNALING=true (a verbatim checkpoint, then deltas: the e2e daemon runs with
--delta-cutoff 0), `jrnl` runs the same operations journaled (the server replays the journal
entries). After every step both exports, normalised, must be identical, resource order included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, stack_path
from tests.e2e.programs import ITEM_TYPE

pytestmark = pytest.mark.e2e

VERSION = "3.259.0"
PROJECT = "p"
CKPT, JRNL = "ckpt", "jrnl"
NO_JOURNAL = {"PULUMI_DISABLE_JOURNALING": "true"}
CHECKPOINT_CALLS = ("/checkpoint ", "/checkpointverbatim ", "/checkpointdelta ")
JOURNAL_CALL = "/journalentries "
BASE_PAYLOAD = 64
SECRET_SIG = "4dabf18193072939515e22adb298388d"


def write_program(
    directory: Path,
    provider_dir: Path,
    *,
    items: int,
    extras: int,
    bigger: Collection[str] = (),
    fail_names: Collection[str] = (),
) -> None:
    """The chain of programs.py (item1 a child of item0, item_i dependsOn item_i-1, a secret on
    item0) plus unparented `extra` items, each depending on the resource before it.

    Independent resources register and finish in a racy order (checkpointed stacks alone
    differ run to run), so every resource here waits for the one before it: the order of the
    state is then fixed and must be the same on both stacks."""
    lines = [
        f"name: {PROJECT}",
        "runtime: yaml",
        "plugins:",
        "  providers:",
        "    - name: pulumidtest",
        f"      path: {json.dumps(str(provider_dir.resolve()))}",
        "resources:",
    ]
    names = [f"item{i}" for i in range(items)] + [f"extra{i}" for i in range(extras)]
    for index, name in enumerate(names):
        size = BASE_PAYLOAD * 3 if name in bigger else BASE_PAYLOAD
        lines += [
            f"  {name}:",
            f"    type: {ITEM_TYPE}",
            "    properties:",
            f"      name: {name}",
            f"      payloadSize: {size}",
        ]
        if name in fail_names:
            lines.append("      fail: true")
        if index == 0:
            lines += ["      secret:", f"        fn::secret: s3cr3t-{PROJECT}"]
        if index == 1:
            lines += ["    options:", "      parent: ${item0}"]
        elif index >= 2:
            lines += ["    options:", "      dependsOn:", f"        - ${{{names[index - 1]}}}"]
    lines += ["outputs:", f"  count: {items}", "  secretOut: ${item0.secret}"]
    (directory / "Pulumi.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _strings(value: Any, fix: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [_strings(v, fix) for v in value]
    if isinstance(value, dict):
        return {k: _strings(v, fix) for k, v in value.items()}
    return value


def _without_ids(resource: Mapping[str, Any]) -> dict[str, Any]:
    r = {k: v for k, v in resource.items() if k not in ("created", "modified")}
    if str(r.get("type", "")).startswith("pulumi:providers:"):
        r["id"] = "PROVIDER-ID"
    if "provider" in r:
        r["provider"] = str(r["provider"]).rsplit("::", 1)[0] + "::PROVIDER-ID"
    return r


def _strip_ciphertexts(value: Any) -> Any:
    if isinstance(value, list):
        return [_strip_ciphertexts(v) for v in value]
    if isinstance(value, dict):
        if SECRET_SIG in value and "ciphertext" in value:
            return {**value, "ciphertext": "CIPHERTEXT"}
        return {k: _strip_ciphertexts(v) for k, v in value.items()}
    return value


def normalise(document: Mapping[str, Any], stack: str) -> dict[str, Any]:
    """What must not differ between the two stacks: no times, ids, stack names, ciphertexts."""
    deployment = dict(document["deployment"])
    deployment.pop("manifest", None)
    deployment["resources"] = [_without_ids(r) for r in deployment.get("resources") or []]
    deployment["pending_operations"] = [
        {**op, "resource": _without_ids(op.get("resource") or {})}
        for op in deployment.get("pending_operations") or []
    ]
    providers = json.loads(json.dumps(deployment.get("secrets_providers") or {}))
    state = providers.get("state")
    if isinstance(state, dict) and state.get("stack") == stack:
        state["stack"] = "STACK"
    deployment["secrets_providers"] = providers

    urn_prefix = re.compile(rf"^urn:pulumi:{re.escape(stack)}::")
    stack_resource = f"::pulumi:pulumi:Stack::{PROJECT}-{stack}"

    def fix(text: str) -> str:
        if not text.startswith("urn:pulumi:"):
            return text
        text = urn_prefix.sub("urn:pulumi:STACK::", text)
        return text.replace(stack_resource, f"::pulumi:pulumi:Stack::{PROJECT}-STACK")

    normalised: dict[str, Any] = _strings(_strip_ciphertexts(deployment), fix)
    return normalised


class LogCursor:
    """The daemon log (its access lines) written since the previous call."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.offset = 0

    def since_last(self) -> str:
        data = self.daemon.log_path.read_bytes()
        text = data[self.offset :].decode(errors="replace")
        self.offset = len(data)
        return text


def calls(log: str, stack: str, suffixes: Collection[str]) -> list[str]:
    needle = f"{stack_path('acme', PROJECT, stack)}/"
    return [
        line for line in log.splitlines() if needle in line and any(s in line for s in suffixes)
    ]


# Heavy: the two ends of the storage matrix are enough.
@pytest.mark.storages("sqlite", "postgres+s3")
def test_journal_and_checkpoints_give_the_same_state(
    daemon: Daemon,
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
) -> None:
    cli = make_cli(VERSION, daemon)
    p = make_project(cli, daemon, PROJECT, items=1)
    for stack in (CKPT, JRNL):
        cli.run("stack", "init", f"acme/{stack}", cwd=p)
    log = LogCursor(daemon)
    checkpoint_kinds: set[str] = set()

    def both(step: str, *args: str, fails: bool = False) -> None:
        """Run `pulumi ARGS` on both stacks, then compare their states and their requests."""
        for stack, env in ((CKPT, NO_JOURNAL), (JRNL, {})):
            full = (*args, "--stack", f"acme/{stack}")
            if fails:
                cli.fail(*full, cwd=p, env_extra=env)
            else:
                cli.run(*full, cwd=p, env_extra=env)
        requests = log.since_last()
        ckpt_saves = calls(requests, CKPT, CHECKPOINT_CALLS)
        assert ckpt_saves, f"{step}: no checkpoint from the ckpt stack:\n{requests[-4000:]}"
        checkpoint_kinds.update(k for k in CHECKPOINT_CALLS for line in ckpt_saves if k in line)
        assert not calls(requests, CKPT, [JOURNAL_CALL]), f"{step}: ckpt stack journaled"
        assert calls(requests, JRNL, [JOURNAL_CALL]), f"{step}: no journal entries:\n{requests}"
        assert not calls(requests, JRNL, CHECKPOINT_CALLS), f"{step}: jrnl stack checkpointed"

        exported = {
            stack: daemon.api_ok("GET", stack_path("acme", PROJECT, stack) + "/export")
            for stack in (CKPT, JRNL)
        }
        ckpt, jrnl = (normalise(exported[s], s) for s in (CKPT, JRNL))
        assert [r["urn"] for r in jrnl["resources"]] == [r["urn"] for r in ckpt["resources"]], step
        assert jrnl["resources"] == ckpt["resources"], step
        assert jrnl["pending_operations"] == ckpt["pending_operations"], step
        assert jrnl == ckpt, step

    up = ("up", "--yes", "--skip-preview")

    write_program(p, provider_dir, items=4, extras=2)
    both("create", *up)
    write_program(p, provider_dir, items=4, extras=2, bigger={"item1", "extra0"})
    both("update", *up)
    write_program(p, provider_dir, items=6, extras=3, bigger={"item1", "extra0"})
    both("add", *up)
    write_program(p, provider_dir, items=5, extras=1, bigger={"item1", "extra0"})
    both("delete", *up)
    both("refresh", "refresh", "--yes", "--skip-preview")
    write_program(p, provider_dir, items=8, extras=1, bigger={"item1"}, fail_names={"item6"})
    both("failing create", *up, fails=True)
    write_program(p, provider_dir, items=8, extras=1, bigger={"item1"})
    both("fixed", *up)

    # The secrets decrypt to the same plaintexts on both stacks.
    shown = {
        s: json.loads(
            cli.run("stack", "export", "--show-secrets", "--stack", f"acme/{s}", cwd=p).stdout
        )
        for s in (CKPT, JRNL)
    }
    assert normalise(shown[JRNL], JRNL) == normalise(shown[CKPT], CKPT)
    assert "s3cr3t-p" in json.dumps(shown[JRNL])

    both("destroy", "destroy", "--yes", "--skip-preview")
    assert {"/checkpointverbatim ", "/checkpointdelta "} <= checkpoint_kinds, checkpoint_kinds
