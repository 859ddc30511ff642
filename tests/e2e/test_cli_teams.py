"""Teams with the real CLI: people signed in through a real OpenID provider (oidc-provider from
npm), roles from the RBAC file, CI jobs exchanging their OIDC token, the browser login."""

from __future__ import annotations

import http.cookiejar
import os
import pty
import select
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, strip_ansi, wait_until
from tests.e2e.programs import write_yaml_program
from tests.oidc_provider import OIDCProvider, oidc_provider, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]

CI_AUDIENCE = "pulumid-ci"
CLI_AUDIENCE = "pulumid-cli"
# Environment variables by which the CLI decides it runs in CI (and so is not interactive).
CI_MARKERS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "TRAVIS", "CIRCLECI", "TF_BUILD")


def rbac(path: Path, issuer: str) -> Path:
    path.write_text(
        f"""
organizations:
  acme:
    default_role: none
    groups:
      platform: admin
      readers: read
token_exchange:
  - issuer: {issuer}
    audience: {CI_AUDIENCE}
    rules:
      - organization: acme
        subject: "repo:acme/infra:*"
        role: write
        max_lifetime: 900
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def provider() -> Iterator[OIDCProvider]:
    with oidc_provider(["http://127.0.0.1:1/login/callback"]) as started:
        yield started


def jwt_for(provider: OIDCProvider, login: str, groups: list[str], **claims: Any) -> str:
    now = int(time.time())
    body = {
        "sub": login,
        "email": f"{login}@example.com",
        "groups": groups,
        "aud": CLI_AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    return provider.mint(body)


def test_jwt_users_get_the_roles_of_their_groups(
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_version: str,
    provider: OIDCProvider,
    provider_dir: Path,
    tmp_path: Path,
) -> None:
    daemon = start_daemon(
        auth_mode="jwt",
        rbac_config=rbac(tmp_path / "rbac.yaml", provider.issuer),
        jwt_jwks_url=provider.jwks_url,
        jwt_issuer=provider.issuer,
        jwt_audience=CLI_AUDIENCE,
    )
    alice = make_cli(cli_version, daemon)
    alice.env["PULUMI_ACCESS_TOKEN"] = jwt_for(provider, "alice", ["platform"])
    work = tmp_path / "work"
    write_yaml_program(work, project="teams", provider_dir=provider_dir, count=2)
    login = alice.run("login", daemon.url, cwd=work)
    assert "alice@example.com" in login.stdout + login.stderr
    alice.run("stack", "init", "acme/dev", cwd=work)
    alice.run("up", "--yes", "--skip-preview", cwd=work)

    bob = make_cli(cli_version, daemon)
    bob.env["PULUMI_ACCESS_TOKEN"] = jwt_for(provider, "bob", ["readers"])
    bob.run("login", daemon.url, cwd=work)
    listed = bob.run("stack", "ls", "--all", cwd=work).stdout
    assert "dev" in listed, listed
    bob.run("stack", "select", "acme/dev", cwd=work)
    exported = bob.run("stack", "export", cwd=work).stdout
    assert "pulumidtest:index:Item" in exported
    refused = bob.fail("up", "--yes", "--skip-preview", cwd=work)
    assert "bob@example.com has the read role on stack acme/teams/dev" in refused, refused
    assert "this needs write" in refused

    # The RBAC file changes and the daemon is told (SIGHUP): readers may write now.
    policy = tmp_path / "rbac.yaml"
    policy.write_text(policy.read_text().replace("readers: read", "readers: write"))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in daemon.log_text(), 20, "the daemon to reload the RBAC file")
    bob.run("up", "--yes", "--skip-preview", cwd=work)

    # A token signed by a key the issuer never published is refused at login.
    mallory = make_cli(cli_version, daemon)
    mallory.env["PULUMI_ACCESS_TOKEN"] = provider.mint(
        {
            "sub": "mallory",
            "email": "alice@example.com",
            "groups": ["platform"],
            "aud": CLI_AUDIENCE,
            "exp": int(time.time()) + 600,
        },
        key="foreign",
    )
    mallory.fail("login", daemon.url, cwd=work)


def test_ci_jobs_exchange_their_oidc_token(
    start_daemon: Callable[..., Daemon],
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_version: str,
    provider: OIDCProvider,
    provider_dir: Path,
    tmp_path: Path,
) -> None:
    daemon = start_daemon(
        auth_mode="jwt",
        rbac_config=rbac(tmp_path / "rbac.yaml", provider.issuer),
        jwt_jwks_url=provider.jwks_url,
        jwt_audience=CLI_AUDIENCE,
    )
    ci = make_cli(cli_version, daemon)
    ci.env.pop("PULUMI_ACCESS_TOKEN")
    work = tmp_path / "work"
    write_yaml_program(work, project="infra", provider_dir=provider_dir, count=2)
    now = int(time.time())

    def ci_token(subject: str, **claims: Any) -> str:
        body = {"sub": subject, "aud": CI_AUDIENCE, "iat": now, "exp": now + 600, **claims}
        return provider.mint(body)

    good = ci_token("repo:acme/infra:ref:refs/heads/main")
    ci.run("login", daemon.url, "--oidc-token", good, "--oidc-org", "acme", cwd=work)
    assert ci.run("whoami", cwd=work).stdout.strip() == "acme"
    ci.run("stack", "init", "acme/prod", cwd=work)
    ci.run("up", "--yes", "--skip-preview", cwd=work)

    # Another repository's job, and a token from an issuer nobody trusts, are refused.
    other = make_cli(cli_version, daemon)
    other.env.pop("PULUMI_ACCESS_TOKEN")
    refused = other.fail(
        "login",
        daemon.url,
        "--oidc-token",
        ci_token("repo:evil/infra:ref:refs/heads/main"),
        "--oidc-org",
        "acme",
        cwd=work,
    )
    assert "no rule" in refused and "repo:evil/infra" in refused, refused
    forged = provider.mint(
        {
            "sub": "repo:acme/infra:ref:refs/heads/main",
            "aud": CI_AUDIENCE,
            "exp": now + 600,
            "iss": "http://127.0.0.1:9/untrusted",
        },
        key="foreign",
    )
    refused = other.fail(
        "login", daemon.url, "--oidc-token", forged, "--oidc-org", "acme", cwd=work
    )
    assert "is not trusted" in refused, refused


# -- the browser login --------------------------------------------------------------------


class Terminal:
    """The CLI on a pseudo-terminal, so it believes a person is at the keyboard."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self._chunks.append(data)
            elif self.proc.poll() is not None:
                return

    @property
    def output(self) -> str:
        return strip_ansi(b"".join(self._chunks).decode(errors="replace"))

    def expect(self, text: str, timeout: float = 60.0) -> None:
        wait_until(
            lambda: text in self.output, timeout, f"{text!r} on the CLI's terminal:\n{self.output}"
        )

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def kill(self) -> None:
        """Ends the CLI if a failed test left it waiting (it would wait for ever)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)
            os.close(self.master)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def visit(opener: urllib.request.OpenerDirector, url: str) -> tuple[int, str]:
    """GET URL without following redirects: (status, Location or body)."""
    try:
        with opener.open(url, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location") or e.read().decode(errors="replace")


def test_browser_login_through_the_provider(
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_version: str,
    provider: OIDCProvider,
    provider_dir: Path,
    tmp_path: Path,
) -> None:
    daemon = Daemon(workdir=tmp_path / "oidc-daemon")
    callback = f"{daemon.url}/login/callback"
    provider.set_redirect_uris([callback])
    daemon.flags.update(
        auth_mode="oidc",
        rbac_config=rbac(tmp_path / "rbac.yaml", provider.issuer),
        oidc_issuer=provider.issuer,
        oidc_client_id=provider.client_id,
        oidc_client_secret=provider.client_secret,
        public_url=daemon.url,
        oidc_scopes="openid email profile groups",
        oidc_recheck_interval=2,
    )
    daemon.start()
    try:
        browser_login(daemon, make_cli(cli_version, daemon), provider, provider_dir, tmp_path)
    finally:
        daemon.stop()


def browser_login(
    daemon: Daemon, cli: PulumiCLI, provider: OIDCProvider, provider_dir: Path, tmp_path: Path
) -> None:
    browser_log = tmp_path / "browser.log"
    bin_dir = tmp_path / "browser-bin"
    bin_dir.mkdir()
    opener_script = bin_dir / "xdg-open"
    opener_script.write_text(f'#!/bin/sh\necho "$1" >> {browser_log}\n')
    opener_script.chmod(0o755)
    env = {k: v for k, v in cli.env.items() if k not in CI_MARKERS}
    env.pop("PULUMI_ACCESS_TOKEN")
    env.update(
        PULUMI_CONSOLE_DOMAIN=f"127.0.0.1:{daemon.port}",
        TERM="xterm",
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    )
    work = tmp_path / "work"
    write_yaml_program(work, project="web", provider_dir=provider_dir, count=2)

    terminal = Terminal([str(cli.binary), "login", daemon.url], env, work)
    try:
        signed_in(terminal, daemon, provider, browser_log)
    finally:
        terminal.kill()
    log_in_again_fails(daemon, cli, provider, work)


def signed_in(
    terminal: Terminal, daemon: Daemon, provider: OIDCProvider, browser_log: Path
) -> None:
    callback = f"{daemon.url}/login/callback"
    # "Press <ENTER> to log in with your browser" (3.259) / "hit <ENTER> to log in using
    # your browser" (3.210).
    terminal.expect("<ENTER> to log in")
    terminal.type("\r")
    wait_until(browser_log.exists, 30, f"the CLI to open a browser:\n{terminal.output}")
    login_url = browser_log.read_text().split()[0]
    assert login_url.startswith(f"{daemon.url}/cli-login?"), login_url

    # The person at the browser: pulumid sends them to the provider, they sign in as alice.
    cookies = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(cookies), NoRedirects()
    )
    status, authorize = visit(browser, login_url)
    assert status == 302 and authorize.startswith(provider.issuer), (status, authorize)
    assert "code_challenge_method=S256" in authorize
    back = sign_in(authorize, "alice")
    assert back.startswith(callback), back
    status, to_cli = visit(browser, back)
    assert status == 302 and to_cli.startswith("http://127.0.0.1:"), (status, to_cli)
    status, welcome = visit(browser, to_cli)
    assert status == 307 and welcome.endswith("/welcome/cli"), (status, welcome)

    # alice has no stacks yet: the CLI offers a first step; "Skip for now" is third.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and terminal.proc.poll() is None:
        if "What would you like to do?" in terminal.output:
            terminal.type("\x1b[B\x1b[B\r")
            break
        time.sleep(0.2)
    assert terminal.wait() == 0, terminal.output
    assert "alice@example.com" in terminal.output, terminal.output


def log_in_again_fails(daemon: Daemon, cli: PulumiCLI, provider: OIDCProvider, work: Path) -> None:

    # The CLI keeps pulumid's token: later commands run without any token in the environment.
    no_token = {"PULUMI_ACCESS_TOKEN": None}
    assert cli.run("whoami", cwd=work, env_extra=no_token).stdout.strip() == "alice@example.com"
    cli.run("stack", "init", "acme/dev", cwd=work, env_extra=no_token)
    cli.run("up", "--yes", "--skip-preview", cwd=work, env_extra=no_token)

    # The provider stops vouching for alice: within the re-check interval (2 s) plus the
    # token cache (10 s), her token stops working.
    provider.disable("alice")

    def refused() -> bool:
        return cli.run("stack", "ls", cwd=work, env_extra=no_token, check=False).returncode != 0

    wait_until(refused, 40, "alice's token to stop working after the provider disabled her")
