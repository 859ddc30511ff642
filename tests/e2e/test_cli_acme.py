"""ACME against Debian's pebble on loopback: issuance, the real CLI over https with pebble's
root trusted, renewal, a restart that reuses the stored certificate, a failed challenge
reported clearly. Certificates name 127.0.0.1 (an IP identifier): no DNS is involved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, free_port, wait_until
from tests.e2e.test_cli_tls import LoopbackCA, served_serial

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]

INSTALL = "scripts/install-pebble.sh (apt-get install pebble)"


@dataclass
class Pebble:
    directory: str
    management: str
    ca_file: Path  # trusts pebble's own listener
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            body: bytes = response.read()
            return body

    def roots(self, target: Path) -> Path:
        """Pebble's issuing root (made anew at each start), for the CLI to trust."""
        target.write_bytes(self.get(self.management + "/roots/0"))
        return target


@pytest.fixture
def pebble_for(tmp_path: Path) -> Iterator[Callable[[int], Pebble]]:
    """Factory: a pebble whose HTTP-01 validations go to 127.0.0.1:HTTP_PORT."""
    binary = shutil.which("pebble") or "/usr/bin/pebble"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"pebble is missing: run {INSTALL}", pytrace=False)
    started: list[Pebble] = []

    def start(http_port: int) -> Pebble:
        work = tmp_path / f"pebble{len(started)}"
        work.mkdir()
        ca = LoopbackCA()
        (work / "ca.pem").write_bytes(ca.pem())
        ca.issue(work / "cert.pem", work / "key.pem")
        port, management = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{port}",
                "managementListenAddress": f"127.0.0.1:{management}",
                "certificate": str(work / "cert.pem"),
                "privateKey": str(work / "key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (work / "config.json").write_text(json.dumps(config))
        log = work / "pebble.log"
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [binary, "-config", str(work / "config.json")],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        pebble = Pebble(
            f"https://127.0.0.1:{port}/dir",
            f"https://127.0.0.1:{management}",
            work / "ca.pem",
            proc,
            log,
        )
        started.append(pebble)

        def answers() -> bool:
            try:
                return b"newOrder" in pebble.get(pebble.directory)
            except OSError:
                return False

        wait_until(answers, 20, "pebble's directory", details=lambda: log.read_text())
        return pebble

    yield start
    for pebble in started:
        if pebble.proc.poll() is None:
            os.killpg(pebble.proc.pid, signal.SIGTERM)
            pebble.proc.wait(10)


def acme_daemon(tmp_path: Path, pebble: Pebble, http_port: int, **flags: object) -> Daemon:
    daemon = Daemon(workdir=tmp_path / "daemon")
    daemon.flags.update(
        acme_domains="127.0.0.1",
        acme_directory=pebble.directory,
        acme_ca_file=pebble.ca_file,
        acme_email="ops@example.com",
        acme_http_listen=f"tcp:{http_port}:interface=127.0.0.1",
        **flags,
    )
    return daemon


def test_issue_renew_and_restart(
    pebble_for: Callable[[int], Pebble],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_versions: list[str],
    make_project: Callable[..., Path],
    tmp_path: Path,
) -> None:
    http_port = free_port()
    pebble = pebble_for(http_port)
    root = pebble.roots(tmp_path / "pebble-root.pem")
    daemon = acme_daemon(tmp_path, pebble, http_port)
    daemon.ca_file = root
    daemon.start(timeout=60)  # answers over https once the certificate is issued
    try:
        cli = make_cli(cli_versions[0], daemon)
        cli.env["SSL_CERT_FILE"] = str(root)
        work = make_project(cli, daemon, "acme", items=2)
        cli.run("stack", "init", "acme/dev", cwd=work)
        cli.run("up", "--yes", "--skip-preview", cwd=work)
        first = served_serial(daemon.port, root)
        ready = urllib.request.urlopen(daemon.management_url + "/readyz", timeout=10)
        assert "certificate" in ready.read().decode()

        # A restart serves the stored certificate: nothing new is issued.
        daemon.stop()
        daemon.start(timeout=60)
        assert served_serial(daemon.port, root) == first
        assert "issued" not in _after_last_start(daemon.log_text())

        # Due for renewal (renew 100 years ahead): a new certificate, without a restart.
        daemon.stop()
        daemon.flags.update(acme_renew_days=36500, acme_check_interval=2)
        daemon.start(timeout=60)
        renewed = wait_until(
            lambda: (s := served_serial(daemon.port, root)) != first and s,
            30,
            "a renewed certificate",
        )
        wait_until(lambda: served_serial(daemon.port, root) != renewed, 30, "another renewal")
        cli.run("up", "--yes", "--skip-preview", cwd=work)
    finally:
        daemon.stop()


def test_a_failed_challenge_is_reported(
    pebble_for: Callable[[int], Pebble], tmp_path: Path
) -> None:
    # Pebble validates on a port where nothing answers: the challenge fails.
    pebble = pebble_for(free_port())
    daemon = acme_daemon(tmp_path, pebble, free_port())
    daemon.start(wait=False)
    try:

        def reported() -> str | None:
            try:
                urllib.request.urlopen(daemon.management_url + "/readyz", timeout=5)
            except urllib.error.HTTPError as e:
                body = e.read().decode()
                return body if "certificate" in body and "Error" in body else None
            except OSError:
                return None
            return None

        body = wait_until(reported, 60, "readiness to report the failed issuance")
        assert "no certificate yet" in body
        assert "ACME: no certificate for" in daemon.log_text()
    finally:
        daemon.stop()


def _after_last_start(log: str) -> str:
    return log.rsplit("==== starting:", 1)[-1]
