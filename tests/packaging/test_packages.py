"""The .deb and the .rpm, built by packaging/build.sh and installed on this machine as root.

The .deb goes through its life with dpkg: install (a pulumid user, /var/lib/pulumid 0700 with
a generated token and master key 0600), the systemd unit's ExecStart started by hand as the
`pulumid` user with the unit's environment file and credentials (systemd is not PID 1 here:
`systemd-analyze verify` checks the unit instead), the real CLI's login / up / export, an
upgrade to a newer version, remove and install again, purge: the stack and the keys survive
every step, and purge leaves /var/lib/pulumid. The .rpm: its file list, scriptlets and
conffile, an install into a scratch root, and the checks a lint would make. lintian checks
the .deb (overrides only for what a self-contained virtualenv under /opt is).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    PulumiCLI,
    build_provider,
    cli_binary,
    cli_environment,
    yaml_host_binary,
)
from tests.e2e.programs import ITEM_TYPE, write_yaml_program

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "0.1.0", "0.1.1"
STATE = Path("/var/lib/pulumid")
UNIT = Path("/lib/systemd/system/pulumid.service")
CLI_VERSION = "3.259.0"


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(
            f"{shlex.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


@dataclass
class Built:
    deb: dict[str, Path]
    rpm: dict[str, Path]
    seconds: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if os.geteuid() != 0:
        pytest.fail("the package tests install packages: run them as root", pytrace=False)
    out = tmp_path_factory.mktemp("packages")
    started = time.monotonic()
    run(str(REPO / "packaging" / "build.sh"), "--version", OLD, "--also-version", NEW,
        "--out", str(out))  # fmt: skip
    seconds = time.monotonic() - started
    deb = {v: out / f"pulumid_{v}-1_amd64.deb" for v in (OLD, NEW)}
    rpm = {v: out / f"pulumid-{v}-1.x86_64.rpm" for v in (OLD, NEW)}
    for path in [*deb.values(), *rpm.values()]:
        assert path.is_file(), path
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB")
    print(f"built both packages, two versions, in {seconds:.0f} s")
    return Built(deb, rpm, seconds)


def purge_everything() -> None:
    """Start from a machine without pulumid (an earlier failed run may have left it)."""
    run("dpkg", "--purge", "pulumid", check=False)
    shutil.rmtree(STATE, ignore_errors=True)
    shutil.rmtree("/etc/pulumid", ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """The installed unit's ExecStart, run by hand the way systemd would run it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.credentials = Path(tempfile.mkdtemp(prefix="pulumid-credentials-", dir="/tmp"))
        self.log = self.credentials.parent / (self.credentials.name + ".log")

    def unit(self) -> dict[str, list[str]]:
        entries: dict[str, list[str]] = {}
        for line in UNIT.read_text().splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.split("=", 1)
                entries.setdefault(key.strip(), []).append(value.strip())
        return entries

    def environment(self) -> dict[str, str]:
        unit = self.unit()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        for path in unit["EnvironmentFile"]:
            for line in Path(path).read_text().splitlines():
                if line and not line.startswith("#"):
                    key, value = line.split("=", 1)
                    env[key] = value
        # LoadCredential=NAME:PATH: systemd copies PATH into $CREDENTIALS_DIRECTORY (%d).
        shutil.rmtree(self.credentials)
        self.credentials.mkdir(mode=0o700)
        for spec in unit["LoadCredential"]:
            name, source = spec.split(":", 1)
            shutil.copyfile(source, self.credentials / name)
        shutil.chown(self.credentials, "pulumid", "pulumid")
        for child in self.credentials.iterdir():
            shutil.chown(child, "pulumid", "pulumid")
            child.chmod(0o400)
        for spec in unit["Environment"]:
            for assignment in shlex.split(spec):
                key, value = assignment.split("=", 1)
                env[key] = value.replace("%d", str(self.credentials))
        # Loopback ports of this test's choosing instead of the env file's 8080 / 9090.
        env["PULUMID_LISTEN"] = f"tcp:{self.port}:interface=127.0.0.1"
        env["PULUMID_MANAGEMENT_LISTEN"] = f"tcp:{free_port()}:interface=127.0.0.1"
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        unit = self.unit()
        [command] = unit["ExecStart"]
        [user] = unit["User"]
        [workdir] = unit["WorkingDirectory"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["runuser", "-u", user, "--", *shlex.split(command)],
                env=self.environment(),
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        token = STATE.joinpath("token").read_text().strip()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the service exited {self.proc.returncode}:\n{self.log.read_text()}")
            request = urllib.request.Request(
                self.url + "/api/capabilities", headers={"Authorization": f"token {token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the service did not answer:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.credentials, ignore_errors=True)


@pytest.fixture
def service() -> Iterator[Service]:
    made = Service()
    try:
        yield made
    finally:
        made.close()


def cli_for(tmp_path: Path) -> PulumiCLI:
    binary = cli_binary(CLI_VERSION)
    home = tmp_path / "pulumi-home"
    home.mkdir()
    token = STATE.joinpath("token").read_text().strip()
    env = cli_environment(
        CLI_VERSION, home, token, [binary.parent, yaml_host_binary().parent, build_provider()]
    )
    return PulumiCLI(version=CLI_VERSION, binary=binary, env=env, workdir=tmp_path)


def items(export: dict[str, Any]) -> list[str]:
    resources = export["deployment"].get("resources") or []
    return sorted(str(r["urn"]) for r in resources if r.get("type") == ITEM_TYPE)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_deb_installs_upgrades_and_keeps_its_data(
    built: Built, service: Service, tmp_path: Path
) -> None:
    purge_everything()
    try:
        started = time.monotonic()
        output = run("dpkg", "-i", str(built.deb[OLD]))
        assert f"generated {STATE}/token" in output and f"{STATE}/master-key" in output, output
        owner = pwd.getpwnam("pulumid")
        assert owner.pw_dir == str(STATE) and owner.pw_shell.endswith("nologin")
        assert mode(STATE) == 0o700 and STATE.stat().st_uid == owner.pw_uid
        for name in ("token", "master-key"):
            assert mode(STATE / name) == 0o600 and (STATE / name).stat().st_uid == owner.pw_uid
        token, key = (STATE / "token").read_text(), (STATE / "master-key").read_text()
        env_file = Path("/etc/pulumid/pulumid.env").read_text()
        assert "PULUMID_DATABASE=/var/lib/pulumid/pulumid.db" in env_file
        assert "#PULUMID_SECRETS_KEY=local" in env_file  # every variable, commented
        run("systemd-analyze", "verify", str(UNIT))
        assert Path("/usr/bin/pulumid-admin").resolve() == Path(
            "/opt/pulumid/venv/bin/pulumid-admin"
        )
        run("/usr/bin/pulumid-admin", "--help")

        service.start()
        cli = cli_for(tmp_path)
        project = tmp_path / "project"
        write_yaml_program(project, project="p", provider_dir=build_provider(), count=3)
        cli.run("login", service.url, cwd=project)
        cli.run("stack", "init", "organization/pkg", cwd=project)
        cli.run("config", "set", "--secret", "pw", "hunter2", cwd=project)
        cli.run("up", "--yes", "--skip-preview", cwd=project)
        print(f"dpkg -i to the first `pulumi up` done: {time.monotonic() - started:.1f} s")
        before = json.loads(cli.run("stack", "export", cwd=project).stdout)
        assert len(items(before)) == 3
        service.stop()
        assert oct(mode(STATE / "pulumid.db")) == oct(0o600)

        def intact() -> None:
            service.start()
            after = json.loads(cli.run("stack", "export", cwd=project).stdout)
            assert items(after) == items(before)
            assert cli.run("config", "get", "pw", cwd=project).stdout.strip() == "hunter2"
            cli.run("up", "--yes", "--skip-preview", "--expect-no-changes", cwd=project)
            service.stop()
            assert (STATE / "token").read_text() == token
            assert (STATE / "master-key").read_text() == key

        # Upgrade to a newer package: the data, keys and the conffile stay.
        output = run("dpkg", "-i", str(built.deb[NEW]))
        assert "generated" not in output, output
        assert run("dpkg-query", "-W", "-f=${Version}", "pulumid") == f"{NEW}-1"
        assert Path("/etc/pulumid/pulumid.env").read_text() == env_file
        intact()

        # Remove, then install again: the data was never touched.
        run("dpkg", "-r", "pulumid")
        assert not Path("/opt/pulumid/venv").exists()
        assert (STATE / "pulumid.db").is_file() and (STATE / "master-key").is_file()
        run("dpkg", "-i", str(built.deb[NEW]))
        intact()

        # Purge: the configuration goes, the data stays unless asked.
        output = run("dpkg", "--purge", "pulumid")
        assert "kept /var/lib/pulumid" in output, output
        assert not Path("/etc/pulumid").exists()
        assert (STATE / "pulumid.db").is_file() and (STATE / "token").read_text() == token
        # ... and when asked, the data goes too.
        run("dpkg", "-i", str(built.deb[NEW]))
        assert (STATE / "token").read_text() == token
        output = run("dpkg", "--purge", "pulumid", env={**os.environ, "PULUMID_PURGE_DATA": "yes"})
        assert "removed /var/lib/pulumid" in output and not STATE.exists(), output
    finally:
        service.stop()
        purge_everything()


def test_lintian_finds_no_errors(built: Built) -> None:
    output = run("lintian", "--tag-display-limit", "0", str(built.deb[OLD]), check=False)
    errors = [line for line in output.splitlines() if line.startswith("E:")]
    assert errors == [], output
    print(output)


def test_the_rpm_lists_its_files_and_scriptlets_and_installs_into_a_root(
    built: Built, tmp_path: Path
) -> None:
    rpm = str(built.rpm[OLD])
    files = set(run("rpm", "-qpl", rpm).split())
    for expected in (
        "/opt/pulumid/venv/bin/twistd",
        "/opt/pulumid/venv/bin/python",
        "/usr/lib/systemd/system/pulumid.service",
        "/etc/pulumid/pulumid.env",
        "/usr/bin/pulumid-admin",
        "/usr/share/doc/pulumid/copyright",
    ):
        assert expected in files, expected
    assert not any(f.startswith("/lib/systemd") for f in files)
    assert run("rpm", "-qpc", rpm).split() == ["/etc/pulumid/pulumid.env"]
    scripts = run("rpm", "-qp", "--scripts", rpm)
    for scriptlet in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{scriptlet} scriptlet" in scripts, scripts
    assert "useradd --system" in scripts and "token_hex(32)" in scripts
    info = run("rpm", "-qpi", rpm)
    assert f"Version     : {OLD}" in info and "Apache-2.0" in info
    requires = run("rpm", "-qpR", rpm)
    assert "python3.11" in requires, requires

    # Into a scratch root: no shell there to run scriptlets, so files only.
    root = tmp_path / "root"
    run("rpm", "-i", "--nodeps", "--noscripts", "--root", str(root), rpm)
    venv = root / "opt/pulumid/venv"
    assert (venv / "bin/twistd").read_text().splitlines()[0] == "#!/opt/pulumid/venv/bin/python3.11"
    assert (root / "usr/lib/systemd/system/pulumid.service").is_file()
    assert run("rpm", "--root", str(root), "-q", "pulumid").strip() == f"pulumid-{OLD}-1.x86_64"
    # The scripted lint: no path of the build machine's staging tree left in any text file.
    leaked = run("grep", "-rlI", "-e", "/tmp/tmp", str(venv), check=False).split()
    assert leaked == [], leaked[:10]
    assert (venv / "lib/python3.11/site-packages/twisted/plugins/dropin.cache").is_file()
