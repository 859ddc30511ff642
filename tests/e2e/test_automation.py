"""The Automation API of the `pulumi` Python SDK, driving the real CLI against a live daemon.

Programs are *inline* (the SDK serves them in-process, so no language host is needed) and use
dynamic providers (tests/e2e/dynamic_program.py), which the CLI runs through the shim
tests/e2e/bin/pulumi-resource-pulumi-python. Every dynamic resource carries its serialized
provider as a secret, so these stacks exercise the daemon's encrypt/batch-decrypt endpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pulumi import automation as auto

from tests.e2e.dynamic_program import (
    SECRET_OUTPUT,
    chain_program,
    many_program,
    mixed_program,
)
from tests.e2e.helpers import (
    AGENT_MARKER_PREFIXES,
    AGENT_MARKERS,
    ORG,
    REPO,
    Daemon,
    cli_binary,
    cli_environment,
)
from tests.load.clients import read_memory

pytestmark = pytest.mark.e2e

SHIM_DIR = Path(__file__).resolve().parent / "bin"
SHIM = SHIM_DIR / "pulumi-resource-pulumi-python"


@dataclass
class Automation:
    """Builds Automation API stacks for one CLI version, pointed at one daemon."""

    version: str
    daemon: Daemon
    workdir: Path
    command: auto.PulumiCommand
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    def stack(self, project: str, stack: str, program: Callable[[], None]) -> auto.Stack:
        work_dir = self.workdir / f"{project}-{stack}"
        work_dir.mkdir(parents=True, exist_ok=True)
        opts = auto.LocalWorkspaceOptions(
            work_dir=str(work_dir),
            pulumi_home=self.env["PULUMI_HOME"],
            env_vars=self.env,
            pulumi_command=self.command,
            project_settings=auto.ProjectSettings(name=project, runtime="python"),
        )
        return auto.create_or_select_stack(
            stack_name=f"{self.daemon.org}/{project}/{stack}",
            project_name=project,
            program=program,
            opts=opts,
        )

    def on_output(self, line: str) -> None:
        self.log.append(line)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log[-lines:])


@pytest.fixture
def automation(
    cli_version: str, daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Automation]:
    binary = cli_binary(cli_version)  # pytest.fail (never skip) when the CLI is missing
    if not (SHIM.is_file() and os.access(SHIM, os.X_OK)):
        pytest.fail(f"{SHIM} is missing or not executable", pytrace=False)
    # The SDK runs the CLI with os.environ overlaid by env_vars: variables can only be
    # overridden, not removed, so strip agent markers and stray PULUMI_* from this process.
    for name in list(os.environ):
        if name in AGENT_MARKERS or name.startswith((*AGENT_MARKER_PREFIXES, "PULUMI_")):
            monkeypatch.delenv(name)
    # PulumiCommand(root=R) runs R/bin/pulumi.
    root = tmp_path / f"cli-root-{cli_version}"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "pulumi").symlink_to(binary)
    home = tmp_path / "pulumi-home"
    home.mkdir()
    env = cli_environment(cli_version, home, daemon.token, [SHIM_DIR, binary.parent])
    env.update(
        PULUMI_BACKEND_URL=daemon.url,
        PULUMID_TEST_PYTHON=sys.executable,
        # The provider process imports tests.e2e.dynamic_program (pickled by reference).
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    command = auto.PulumiCommand(root=str(root), skip_version_check=True)
    yield Automation(
        version=cli_version, daemon=daemon, workdir=tmp_path / "work", command=command, env=env
    )


def exported_resources(stack: auto.Stack) -> list[dict[str, Any]]:
    deployment = stack.export_stack().deployment or {}
    return list(deployment.get("resources") or [])


def by_name(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["urn"]).rsplit("::", 1)[-1]: r for r in resources}


def echo_names(resources: list[dict[str, Any]]) -> set[str]:
    return {
        str(r["urn"]).rsplit("::", 1)[-1]
        for r in resources
        if str(r["type"]).startswith("pulumi-python:dynamic")
    }


def timed(label: str, timings: dict[str, float], action: Callable[[], Any]) -> Any:
    start = time.monotonic()
    result = action()
    timings[label] = time.monotonic() - start
    return result


# --------------------------------------------------------------------------------------------


MIXED_RESOURCES = 7  # stack, root, group (component), group-first, group-second, leaf, vault


def test_inline_program_lifecycle(automation: Automation) -> None:
    stack = automation.stack("auto", "dev", mixed_program)
    out = automation.on_output
    stack.set_config("pw", auto.ConfigValue("hunter2", secret=True))
    assert stack.get_config("pw").secret
    assert stack.get_config("pw").value == "hunter2"

    up = stack.up(on_output=out)
    assert up.summary.result == "succeeded", automation.tail()
    assert up.summary.resource_changes == {"create": MIXED_RESOURCES}
    outputs = up.outputs
    assert outputs["secret"].secret is True
    assert outputs["secret"].value == SECRET_OUTPUT
    assert outputs["pw_echo"].secret is True
    assert outputs["pw_echo"].value == "vault:hunter2"
    assert outputs["pw_value"].secret is True
    assert outputs["pw_value"].value == "hunter2"
    assert outputs["root_echo"].secret is False
    assert outputs["root_echo"].value == "root:hello"
    assert outputs["leaf_echo"].value == "leaf:root:hello"
    assert outputs["second_echo"].value == "group-second:group-first:one"
    assert str(outputs["root_id"].value).startswith("echo-root-")
    again = stack.outputs()
    assert again["secret"].secret is True and again["secret"].value == SECRET_OUTPUT

    resources = exported_resources(stack)
    named = by_name(resources)
    assert echo_names(resources) == {"root", "group-first", "group-second", "leaf", "vault"}
    group_urn = named["group"]["urn"]
    assert named["group-first"]["parent"] == group_urn
    assert named["group-second"]["parent"] == group_urn
    assert named["leaf"]["parent"] == group_urn
    assert named["group-first"]["urn"] in named["group-second"]["dependencies"]
    assert named["root"]["urn"] in named["group"]["dependencies"]
    assert named["root"]["id"] == outputs["root_id"].value
    # export_stack() runs `stack export --show-secrets`; the stored state must be ciphertext.
    stored = json.dumps(automation.daemon.api_ok("GET", f"/api/stacks/{ORG}/auto/dev/export"))
    assert "hunter2" not in stored and SECRET_OUTPUT not in stored, "plaintext secret in state"
    assert "ciphertext" in stored

    preview = stack.preview(on_output=out)
    assert preview.change_summary == {"same": MIXED_RESOURCES}, automation.tail()

    noop = stack.up(on_output=out)
    assert noop.summary.result == "succeeded"
    assert noop.summary.resource_changes == {"same": MIXED_RESOURCES}, automation.tail()
    assert noop.outputs["secret"].secret is True
    assert noop.outputs["pw_echo"].value == "vault:hunter2"

    refresh = stack.refresh(on_output=out)
    assert refresh.summary.result == "succeeded"
    assert refresh.summary.kind == "refresh"

    destroy = stack.destroy(on_output=out)
    assert destroy.summary.result == "succeeded"
    assert destroy.summary.resource_changes == {"delete": MIXED_RESOURCES}
    assert echo_names(exported_resources(stack)) == set()

    # Pulumi Cloud's history lists previews too, with kind "preview".
    everything = stack.history()
    assert [h.kind for h in everything] == ["destroy", "refresh", "update", "preview", "update"]
    history = [h for h in everything if h.kind != "preview"]
    assert all(h.result == "succeeded" for h in everything)
    versions = [h.version for h in history]
    assert versions == sorted((v for v in versions if v is not None), reverse=True)
    assert len(set(versions)) == len(versions)
    assert history[-1].resource_changes == {"create": MIXED_RESOURCES}
    assert history[-2].resource_changes == {"same": MIXED_RESOURCES}
    assert history[0].resource_changes == {"delete": MIXED_RESOURCES}
    shown = history[-1].config["auto:pw"]  # history(show_secrets=True) decrypts it
    assert shown.secret is True and shown.value == "hunter2"
    hidden = stack.history(show_secrets=False)[-1].config["auto:pw"]
    assert hidden.secret is True and hidden.value != "hunter2"
    raw_history = json.dumps(automation.daemon.api_ok("GET", f"/api/stacks/{ORG}/auto/dev/updates"))
    assert "hunter2" not in raw_history
    assert [h.kind for h in stack.history(page_size=2, page=2)] == ["update", "preview"]


MANY = 100
# The daemon's peak RSS over this test measured 164 MiB (3.259.0) and 226 MiB (3.210.0);
# before deltas were compacted and read lazily, 3.210.0 took it to 970 MiB.
PEAK_RSS_LIMIT = 400 * 2**20
# Fewer resources with twice the padding: the same bytes of secrets per checkpoint, half the
# checkpoints (CLI 3.210.0 re-encrypts them all at each: 193 s of CI at 200 x 8 KB).
PADDING = 16 * 1024  # bytes of provider state per resource: the checkpoint's secrets > 2 MiB


# Heavy: the two ends of the storage matrix are enough.
@pytest.mark.storages("sqlite", "postgres+s3")
def test_many_dynamic_resources(automation: Automation) -> None:
    stack = automation.stack("many", "dev", many_program(MANY, PADDING))
    out = automation.on_output
    timings: dict[str, float] = {}

    up = timed("up (create)", timings, lambda: stack.up(on_output=out, parallel=16))
    assert up.summary.result == "succeeded", automation.tail()
    assert up.summary.resource_changes == {"create": MANY + 1}

    resources = exported_resources(stack)
    assert len(echo_names(resources)) == MANY
    secret_bytes = sum(len(json.dumps(r.get("outputs", {}).get("__provider"))) for r in resources)
    assert secret_bytes > 2 * 1024 * 1024, secret_bytes

    noop = timed("up (no-op)", timings, lambda: stack.up(on_output=out, parallel=16))
    assert noop.summary.result == "succeeded", automation.tail()
    assert noop.summary.resource_changes == {"same": MANY + 1}, automation.tail()

    preview = timed("preview", timings, lambda: stack.preview(on_output=out))
    assert preview.change_summary == {"same": MANY + 1}

    destroy = timed("destroy", timings, lambda: stack.destroy(on_output=out, parallel=16))
    assert destroy.summary.resource_changes == {"delete": MANY + 1}

    # CLI 3.210.0 re-encrypts every secret at every checkpoint (hundreds of MB of batch
    # responses): what one request holds is bounded, so the daemon's peak stays small.
    assert automation.daemon.proc is not None
    memory = read_memory(automation.daemon.proc.pid)
    assert memory is not None
    peak = memory[1]
    print(
        f"\n[{automation.version}] {MANY} dynamic resources, "
        f"~{secret_bytes // 1024} KiB of provider secrets: "
        + ", ".join(f"{label} {seconds:.1f}s" for label, seconds in timings.items())
        + f"; daemon peak RSS {peak / 2**20:.0f} MiB"
    )
    assert peak < PEAK_RSS_LIMIT, f"daemon peak RSS {peak / 2**20:.0f} MiB"


CHAIN = 6


def test_failure_part_way_keeps_created_resources(automation: Automation) -> None:
    stack = automation.stack("chain", "dev", chain_program(CHAIN, fail_on=("link-3",)))
    out = automation.on_output
    with pytest.raises(auto.CommandError) as failure:
        stack.up(on_output=out)
    assert "fails on purpose" in str(failure.value)

    resources = exported_resources(stack)
    assert echo_names(resources) == {"link-0", "link-1", "link-2"}
    named = by_name(resources)
    assert named["link-1"]["urn"] in named["link-2"]["dependencies"]
    assert named["link-2"]["outputs"]["echo"] == "link-2:link-1:link-0:start"

    history = stack.history()
    assert [h.kind for h in history] == ["update"]
    assert history[0].result == "failed"

    # The same chain without the failure completes it from the saved state.
    fixed = automation.stack("chain", "dev", chain_program(CHAIN, fail_on=()))
    up = fixed.up(on_output=out)
    assert up.summary.resource_changes == {"same": 4, "create": 3}, automation.tail()
    assert echo_names(exported_resources(fixed)) == {f"link-{i}" for i in range(CHAIN)}
