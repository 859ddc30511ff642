"""YAML Pulumi programs over the test provider `pulumidtest` (tests/provider).

`write_yaml_program` writes a `Pulumi.yaml` whose resources are `pulumidtest:index:Item`s:

    resources:
      item0:
        type: pulumidtest:index:Item
        properties:
          name: item0
          payloadSize: 16384          # output `payload` of exactly that many bytes
          replaceKey: "k1"            # only with replace_key; a change replaces every item
          secret:
            fn::secret: s3cr3t-PROJECT  # only with with_secret
      item1:                          # child of item0
        type: pulumidtest:index:Item
        properties: {name: item1, payloadSize: 16384}
        options:
          parent: ${item0}
      item2:                          # each later item depends on the previous one
        type: pulumidtest:index:Item
        properties: {name: item2, payloadSize: 16384}
        options:
          dependsOn:
            - ${item1}
      extra0:                         # extra_resources: independent items
        ...
    outputs:
      count: 3
      secretOut: ${item0.secret}      # a secret stack output (with_secret and count > 0)

The items form one chain, so an item that fails (`fail_names`) stops every item after it
while all items before it are created. `delay_ms` makes each Create/Update sleep first.

The CLI must find the YAML language host `pulumi-language-yaml`. Either pass
`yaml_host_dir` (adds a `plugins: languages: [{name: yaml, path: DIR}]` entry, so PATH does
not matter and no warning is printed), or put its directory on PATH (`yaml_env`); the CLI
then warns "using pulumi-language-yaml from $PATH" on every command, because it expects
the YAML host next to its own executable. The provider is always found through the
`plugins: providers:` entry, so it need not be on PATH.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

ITEM_TYPE = "pulumidtest:index:Item"


def _scalar(value: str | int | bool) -> str:
    """A YAML scalar: JSON's quoting is valid YAML and never ambiguous."""
    return json.dumps(value)


def _item(
    name: str,
    *,
    payload_size: int,
    delay_ms: int,
    fail: bool,
    replace_key: str | None = None,
    secret: str | None = None,
    parent: str | None = None,
    depends_on: str | None = None,
) -> list[str]:
    lines = [f"  {name}:", f"    type: {ITEM_TYPE}", "    properties:"]
    lines.append(f"      name: {_scalar(name)}")
    if payload_size:
        lines.append(f"      payloadSize: {payload_size}")
    if delay_ms:
        lines.append(f"      delayMs: {delay_ms}")
    if fail:
        lines.append("      fail: true")
    if replace_key is not None:
        lines.append(f"      replaceKey: {_scalar(replace_key)}")
    if secret is not None:
        lines += ["      secret:", f"        fn::secret: {_scalar(secret)}"]
    if parent is not None or depends_on is not None:
        lines.append("    options:")
        if parent is not None:
            lines.append(f"      parent: ${{{parent}}}")
        if depends_on is not None:
            lines += ["      dependsOn:", f"        - ${{{depends_on}}}"]
    return lines


def yaml_program(
    *,
    project: str,
    provider_dir: Path,
    count: int,
    payload_size: int = 0,
    fail_names: Collection[str] = (),
    delay_ms: int = 0,
    with_secret: bool = True,
    extra_resources: int = 0,
    yaml_host_dir: Path | None = None,
    replace_key: str | None = None,
) -> str:
    """The text of the `Pulumi.yaml` that `write_yaml_program` writes."""
    with_secret = with_secret and count > 0  # the secret lives on item0
    lines = [
        f"name: {_scalar(project)}",
        "runtime: yaml",
        "plugins:",
    ]
    if yaml_host_dir is not None:
        lines += [
            "  languages:",
            "    - name: yaml",
            f"      path: {_scalar(str(Path(yaml_host_dir).resolve()))}",
        ]
    lines += [
        "  providers:",
        "    - name: pulumidtest",
        f"      path: {_scalar(str(Path(provider_dir).resolve()))}",
    ]
    resources: list[str] = []
    for i in range(count):
        name = f"item{i}"
        resources += _item(
            name,
            payload_size=payload_size,
            delay_ms=delay_ms,
            fail=name in fail_names,
            replace_key=replace_key,
            secret=f"s3cr3t-{project}" if with_secret and i == 0 else None,
            parent="item0" if i == 1 else None,
            depends_on=f"item{i - 1}" if i >= 2 else None,
        )
    for i in range(extra_resources):
        name = f"extra{i}"
        resources += _item(
            name,
            payload_size=payload_size,
            delay_ms=delay_ms,
            fail=name in fail_names,
            replace_key=replace_key,
        )
    lines += ["resources:", *resources] if resources else ["resources: {}"]
    lines += ["outputs:", f"  count: {count}"]
    if with_secret:
        lines.append("  secretOut: ${item0.secret}")
    return "\n".join(lines) + "\n"


def write_yaml_program(
    directory: Path,
    *,
    project: str,
    provider_dir: Path,
    count: int,
    payload_size: int = 0,
    fail_names: Collection[str] = (),
    delay_ms: int = 0,
    with_secret: bool = True,
    extra_resources: int = 0,
    yaml_host_dir: Path | None = None,
    replace_key: str | None = None,
) -> None:
    """Write `directory/Pulumi.yaml` (see the module docstring for its shape)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = yaml_program(
        project=project,
        provider_dir=provider_dir,
        count=count,
        payload_size=payload_size,
        fail_names=fail_names,
        delay_ms=delay_ms,
        with_secret=with_secret,
        extra_resources=extra_resources,
        yaml_host_dir=yaml_host_dir,
        replace_key=replace_key,
    )
    (directory / "Pulumi.yaml").write_text(text, encoding="utf-8")


def yaml_env(
    provider_dir: Path, yaml_host_dir: Path, *, base_path: str | None = None
) -> dict[str, str]:
    """Environment entries a YAML program needs: `PATH` with the YAML host's directory (and
    the provider's, harmlessly) prepended to `base_path` (default: this process's PATH).

    Merge the result over the CLI's environment; put the CLI's own directory first on PATH
    too if it is run by bare name. The caller still sets PULUMI_HOME and friends."""
    base = os.environ.get("PATH", "") if base_path is None else base_path
    entries = [str(Path(yaml_host_dir).resolve()), str(Path(provider_dir).resolve())]
    return {"PATH": os.pathsep.join([*entries, base] if base else entries)}
