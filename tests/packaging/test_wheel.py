"""The wheel on its own: `pip install pulumid` into a fresh venv, away from the source tree.

The wheel is built from this checkout (`pip wheel --no-deps`) and installed into a new
`/usr/bin/python3.11 -m venv` that does not see the system's site-packages; its
dependencies come from the package index (through pip's cache). Every command then runs
from the venv's `bin/`, in a directory outside the repository, with no PYTHONPATH and no
PULUMID_* variables, so nothing can be imported from the checkout:

- the wheel carries the drop-in `twisted/plugins/pulumid_plugin.py` and nothing that would
  shadow Twisted's own packages (`twisted/__init__.py`, `twisted/plugins/__init__.py`) or
  its plugin cache (`dropin.cache`);
- `twistd pulumid --help` describes the plugin's options, `twistd --help` lists `pulumid`
  among its commands, `pulumid-admin --help` works;
- a daemon started with the venv's `twistd` serves one round trip of the real CLI: login,
  `stack init`, `up`, `stack export` with the program's items.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    DEFAULT_CLI_VERSIONS,
    Daemon,
    PulumiCLI,
    build_provider,
    cli_binary,
    cli_environment,
    resources,
    stack_path,
    yaml_host_binary,
)
from tests.e2e.programs import ITEM_TYPE, write_yaml_program

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path("/usr/bin/python3.11")
PLUGIN = "twisted/plugins/pulumid_plugin.py"
CLI_VERSION = os.environ.get("PULUMID_E2E_CLI_VERSIONS", DEFAULT_CLI_VERSIONS).split(",")[0]


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout:
    no PYTHON* (PYTHONPATH above all), no PULUMID_*, no VIRTUAL_ENV, no PATH entry inside
    the repository (its .venv/bin)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PULUMID_")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = os.pathsep.join(
        entry
        for entry in env.get("PATH", os.defpath).split(os.pathsep)
        if entry and not Path(entry).resolve().is_relative_to(REPO)
    )
    return env


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ARGS in the clean environment; fail the test (with the output) on rc != 0."""
    command = [str(a) for a in args]
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{shlex.join(command)} timed out after {timeout}s\n{exc.stdout!r}")
    if result.returncode != 0:
        pytest.fail(
            f"{shlex.join(command)} (cwd {cwd}) exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-5000:]}\nstderr:\n{result.stderr[-5000:]}",
            pytrace=False,
        )
    return result


@dataclass
class Installed:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from this checkout, installed into a fresh venv of its own."""
    if not (PYTHON.is_file() and os.access(PYTHON, os.X_OK)):
        pytest.fail(f"{PYTHON} is missing: the wheel is installed with it", pytrace=False)
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
        "-q", "-w", dist, REPO, cwd=base, timeout=300)  # fmt: skip
    wheels = sorted(dist.glob("pulumid-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    run(PYTHON, "-m", "venv", venv, cwd=base)
    run(venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
        "--no-input", "-q", wheels[0], cwd=base, timeout=600)  # fmt: skip
    return Installed(wheels[0], venv)


def test_wheel_contents(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(
            wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    assert PLUGIN in names, sorted(names)
    # Either would replace Twisted's own package (or its plugins package) on install.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")], sorted(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], sorted(names)
    assert {"pulumid/__init__.py", "pulumid/tap.py"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert "pulumid-admin = pulumid.admin.__main__:main" in entry_points, entry_points


def test_venv_sees_only_the_wheel(installed: Installed, tmp_path: Path) -> None:
    """The venv is isolated, and pulumid and the plugin load from its site-packages."""
    config = (installed.venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config, config
    probe = (
        "import json, sys, pulumid, twisted.plugins.pulumid_plugin as p; "
        "print(json.dumps([pulumid.__file__, p.__file__, sys.path]))"
    )
    out = run(installed.bin("python"), "-c", probe, cwd=tmp_path).stdout
    package, plugin, path = json.loads(out)
    site = installed.venv / "lib" / "python3.11" / "site-packages"
    assert Path(package) == site / "pulumid" / "__init__.py"
    assert Path(plugin) == site / PLUGIN
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(REPO)], path


def test_twistd_lists_the_plugin(installed: Installed, tmp_path: Path) -> None:
    help_ = run(installed.bin("twistd"), "pulumid", "--help", cwd=tmp_path)
    assert help_.stdout.startswith("Usage: twistd [options] pulumid [options]"), help_.stdout
    for option in ("--listen=", "--secrets-key=", "--database=", "--token="):
        assert option in help_.stdout, help_.stdout
    assert "Traceback" not in help_.stderr, help_.stderr
    assert "plugin cache" not in help_.stderr, help_.stderr

    commands = run(installed.bin("twistd"), "--help", cwd=tmp_path).stdout
    lines = [line.split() for line in commands.splitlines()]
    assert ["pulumid", "A", "self-hosted,"] in [words[:3] for words in lines], commands

    admin = run(installed.bin("pulumid-admin"), "--help", cwd=tmp_path).stdout
    assert admin.startswith("usage: pulumid-admin"), admin


@dataclass
class WheelDaemon(Daemon):
    """`twistd pulumid` from the fresh venv, in the clean environment, with the flags a
    first-time user would give it."""

    venv: Path = field(kw_only=True)

    @property
    def db_path(self) -> Path:
        return self.workdir / "db.sqlite"

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "twistd"),
            "-n",
            "--pidfile=",
            "pulumid",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--management-listen", f"tcp:{self.management_port}:interface=127.0.0.1",
            "--database", str(self.db_path),
            "--token", self.token,
            "--master-key", self.master_key,
            "--organization", self.org,
            "--log-format", "text",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return clean_environment()


def test_cli_round_trip(installed: Installed, tmp_path: Path) -> None:
    binary = cli_binary(CLI_VERSION)
    yaml_host_dir = yaml_host_binary().parent
    provider_dir = build_provider()

    daemon = WheelDaemon(workdir=tmp_path, venv=installed.venv)
    daemon.start(timeout=60)
    try:
        log = daemon.log_text()
        # twistd names the interpreter it runs on: the venv's, not the checkout's.
        assert f"({installed.venv}/bin/python" in log, log
        assert "plugin cache" not in log, log

        home = tmp_path / "cli" / "pulumi-home"
        home.mkdir(parents=True)
        env = cli_environment(
            CLI_VERSION, home, daemon.token, [binary.parent, yaml_host_dir, provider_dir]
        )
        cli = PulumiCLI(version=CLI_VERSION, binary=binary, env=env, workdir=tmp_path / "cli")
        project = tmp_path / "project"
        write_yaml_program(project, project="pkg", provider_dir=provider_dir, count=3)

        cli.run("login", daemon.url, cwd=project)
        cli.run("stack", "init", "acme/wheel", cwd=project)
        up = cli.run("up", "--yes", "--skip-preview", cwd=project).stdout
        assert "4 created" in up, up
        state = json.loads(cli.run("stack", "export", cwd=project).stdout)
        items = sorted(
            str(r["urn"]).rsplit("::", 1)[-1] for r in resources(state) if r["type"] == ITEM_TYPE
        )
        assert items == ["item0", "item1", "item2"], state
        stack = daemon.api_ok("GET", stack_path("acme", "pkg", "wheel"))
        assert stack["stackName"] == "wheel", stack

        # twistd shuts down cleanly, then re-raises the signal that stopped it
        # (twisted.application.app._exitWithSignal): -SIGTERM is the clean exit status.
        returncode = daemon.stop()
        assert returncode == -signal.SIGTERM, daemon.log_text()
        assert "Server Shut Down." in daemon.log_text()
        assert daemon.db_path.is_file()
    finally:
        daemon.stop()
