"""A real OpenID Connect provider for the tests: the npm package oidc-provider (pinned in
tests/oidc/package-lock.json, installed outside the repo by scripts/install-oidc-provider.sh)
run by tests/oidc/provider.mjs on a free loopback port, plus a scripted browser (`sign_in`) for
its development login and consent pages.

Blocking and standard-library only (urllib, subprocess), so it works from any thread and before
or without a Twisted reactor. A missing Node.js or install fails loudly; it never skips.

    with oidc_provider(["http://127.0.0.1:8080/callback"]) as op:
        url = f"{op.authorization_endpoint}?{urlencode({...})}"
        redirect = sign_in(url, "alice")      # http://127.0.0.1:8080/callback?code=...&state=...
        op.rotate(); op.disable("alice"); token = op.mint({"sub": "alice", "aud": "x", ...})
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO, Any, Literal, cast

REPO = Path(__file__).resolve().parent.parent
OIDC_DIR = REPO / "tests" / "oidc"
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"
INSTALL_SCRIPT = REPO / "scripts" / "install-oidc-provider.sh"


class OIDCProviderError(RuntimeError):
    """The provider could not be installed, started or driven."""


@dataclass(frozen=True)
class OIDCUser:
    """An account of the provider; the dev login page takes `login` (any password)."""

    login: str
    email: str
    groups: list[str] = field(default_factory=list)
    name: str = ""
    email_verified: bool = True
    hd: str = ""  # Google Workspace's hosted-domain claim, when set


DEFAULT_USERS: tuple[OIDCUser, ...] = (
    OIDCUser("alice", "alice@example.com", ["platform"], "Alice Example"),
    OIDCUser("bob", "bob@example.com", ["readers"], "Bob Example"),
)


def modules_dir() -> Path:
    """The cache directory holding node_modules/oidc-provider, keyed like the install script
    (first 16 hex digits of the lockfile's sha256); fails if it is not installed."""
    lock = (OIDC_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock).hexdigest()[:16]
    cache = Path(os.environ.get("PULUMID_CACHE") or Path.home() / ".cache" / "pulumid")
    path = cache / "oidc-provider" / digest
    if (
        not (path / ".installed").is_file()
        or not (path / "node_modules" / "oidc-provider").is_dir()
    ):
        raise OIDCProviderError(
            f"oidc-provider (the OpenID Connect provider for the tests) is not installed in "
            f"{path}: run {INSTALL_SCRIPT.relative_to(REPO)} (scripts/test.sh does)"
        )
    return path


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise OIDCProviderError(
            "node is not on PATH: the OIDC provider for the tests needs Node.js"
        )
    return node


def pkce_pair() -> tuple[str, str]:
    """A PKCE (code_verifier, S256 code_challenge) pair."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OIDCProvider:
    """One provider process. `start()` launches it and waits for its issuer; `stop()` ends it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._issuer: str | None = None
        self._discovery: dict[str, Any] = {}
        self._client_id = ""
        self._client_secret = ""
        self._test_secret = ""
        self.version = ""

    def start(
        self,
        redirect_uris: Sequence[str],
        users: Sequence[OIDCUser] = DEFAULT_USERS,
        *,
        id_token_ttl: int = 300,
        access_token_ttl: int = 300,
        refresh_token_ttl: int = 86400,
        client_id: str = "pulumid",
        client_secret: str = "secret",
        token_endpoint_auth_method: Literal[
            "client_secret_basic", "client_secret_post"
        ] = "client_secret_basic",
        signing_algs: Sequence[str] = ("RS256", "ES256"),
        refresh_tokens: Literal["always", "offline_access"] = "always",
        port: int = 0,
        timeout: float = 30.0,
    ) -> OIDCProvider:
        """Launch the provider for one confidential client (client_id, client_secret, these
        redirect URIs, PKCE S256 required) and these users; returns once it answers discovery.

        refresh_tokens: "always" issues a refresh token on every code exchange; with
        "offline_access" only when that scope was granted, which oidc-provider does only if the
        authorization request also had prompt=consent. TTLs are in seconds."""
        if self._proc is not None:
            raise OIDCProviderError("this provider is already started")
        self._client_id = client_id
        self._client_secret = client_secret
        self._test_secret = secrets.token_hex(16)
        config = {
            "port": port,
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uris": list(redirect_uris),
            "token_endpoint_auth_method": token_endpoint_auth_method,
            "users": [asdict(u) for u in users],
            "id_token_ttl": id_token_ttl,
            "access_token_ttl": access_token_ttl,
            "refresh_token_ttl": refresh_token_ttl,
            "signing_algs": list(signing_algs),
            "refresh_tokens": refresh_tokens,
            "test_secret": self._test_secret,
            "modules": str(modules_dir()),
            # Our end of its stdin closes when this process dies, and that stops node too.
            "watch_stdin": True,
        }
        # stderr goes to a file: oidc-provider's warnings, and the reason if it fails to start.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [node_binary(), str(PROVIDER_SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=OIDC_DIR,
        )
        try:
            ready = self._first_line(timeout)
            self._issuer = str(ready["issuer"])
            self.version = str(ready.get("version", ""))
            self._discovery = self._get_json("/.well-known/openid-configuration")
        except BaseException:
            self.stop()
            raise
        return self

    def _first_line(self, timeout: float) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        stdout = proc.stdout
        lines: queue.Queue[bytes] = queue.Queue()
        # readline() has no timeout; a daemon thread does it and dies with the pipe.
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise OIDCProviderError(
                f"the OIDC provider did not start within {timeout}s:\n{self.stderr_text()}"
            ) from None
        if not line:
            proc.wait(5)
            raise OIDCProviderError(
                f"the OIDC provider exited with {proc.returncode} before listening:\n"
                f"{self.stderr_text()}"
            )
        return cast(dict[str, Any], json.loads(line))

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> OIDCProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a relying party is configured with

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise OIDCProviderError("the provider is not started")
        return self._issuer

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def client_secret(self) -> str:
        return self._client_secret

    @property
    def discovery(self) -> dict[str, Any]:
        return dict(self._discovery)

    @property
    def jwks_url(self) -> str:
        return str(self._discovery["jwks_uri"])

    @property
    def authorization_endpoint(self) -> str:
        return str(self._discovery["authorization_endpoint"])

    @property
    def token_endpoint(self) -> str:
        return str(self._discovery["token_endpoint"])

    # -- test-only controls (tests/oidc/provider.mjs, under /test/)

    def rotate(self, drop_old: bool = False) -> list[str]:
        """New signing keys, used from now on; the old ones stay published unless drop_old.
        Returns the new kids (one per signing alg, RS256 first)."""
        return cast(list[str], self._control("/test/rotate", {"drop_old": drop_old})["kids"])

    def mint(
        self,
        claims: Mapping[str, Any],
        key: Literal["current", "foreign"] = "current",
        *,
        alg: str = "RS256",
        kid: str | None = None,
        header: Mapping[str, Any] | None = None,
        secret: str | None = None,
    ) -> str:
        """A JWT with these claims (iss defaults to the issuer; nothing else is added), signed
        with the provider's current key for alg (its kid is in the JWKS) or with a key that was
        never published. kid overrides the header's kid; alg "none" gives an unsigned token and
        "HS256" an HMAC with `secret`."""
        body: dict[str, Any] = {"claims": dict(claims), "key": key, "alg": alg}
        if kid is not None:
            body["kid"] = kid
        if header is not None:
            body["header"] = dict(header)
        if secret is not None:
            body["secret"] = secret
        return str(self._control("/test/mint", body)["token"])

    def disable(self, login: str) -> None:
        """findAccount stops finding this user: its refresh grants fail with invalid_grant."""
        self._control("/test/disable", {"login": login})

    def enable(self, login: str) -> None:
        self._control("/test/enable", {"login": login})

    def set_redirect_uris(self, redirect_uris: Sequence[str]) -> None:
        self._control("/test/client", {"redirect_uris": list(redirect_uris)})

    def jwks(self) -> dict[str, Any]:
        """The published JWKS as the provider serves it."""
        return self._get_json(self.jwks_url)

    def current_kids(self) -> list[str]:
        """The kids the provider signs with now (one per signing alg)."""
        return cast(list[str], self._get_json("/test/jwks")["current"])

    def token_request(
        self,
        form: Mapping[str, str],
        auth: Literal["basic", "post"] = "basic",
    ) -> tuple[int, dict[str, Any]]:
        """POST to the token endpoint as this client; (status, JSON body), errors included."""
        fields = dict(form)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if auth == "basic":
            pair = f"{_form_quote(self.client_id)}:{_form_quote(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            fields |= {"client_id": self.client_id, "client_secret": self.client_secret}
        request = urllib.request.Request(
            self.token_endpoint,
            data=urllib.parse.urlencode(fields).encode(),
            headers=headers,
            method="POST",
        )
        return _fetch_json(request)

    def _url(self, path: str) -> str:
        return urllib.parse.urljoin(self.issuer, path)

    def _get_json(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self._url(path), headers={"X-Test-Secret": self._test_secret}
        )
        status, body = _fetch_json(request)
        if status != 200:
            raise OIDCProviderError(f"GET {path}: {status} {body}")
        return body

    def _control(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self._url(path),
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-Test-Secret": self._test_secret},
            method="POST",
        )
        status, answer = _fetch_json(request)
        if status != 200:
            raise OIDCProviderError(f"POST {path}: {status} {answer}")
        return answer


def _form_quote(value: str) -> str:
    # RFC 6749 2.3.1: client_secret_basic credentials are form-urlencoded before base64.
    return urllib.parse.quote_plus(value)


def _fetch_json(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, cast(dict[str, Any], json.loads(response.read()))
    except urllib.error.HTTPError as e:
        with e:
            raw = e.read()
        try:
            return e.code, cast(dict[str, Any], json.loads(raw))
        except ValueError:
            return e.code, {"error": "non-JSON response", "body": raw.decode("utf-8", "replace")}


@contextmanager
def oidc_provider(redirect_uris: Sequence[str], **options: Any) -> Iterator[OIDCProvider]:
    """A started provider for a `with` block or a pytest fixture; options as for start()."""
    provider = OIDCProvider()
    provider.start(redirect_uris, **options)
    try:
        yield provider
    finally:
        provider.stop()


# -- a scripted browser for the dev interactions


class SignInError(AssertionError):
    """The sign-in did not reach the client's redirect_uri."""


@dataclass
class _Form:
    action: str
    method: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    """Every <form> with its action, method and named <input> values."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = _Form(values.get("action", ""), values.get("method", "get"), {})
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and values.get("name"):
            self._current.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


class _NoRaise(urllib.request.HTTPErrorProcessor):
    """Hand back every response as is: redirects are followed by sign_in itself, so it can stop
    at the one that leaves the provider."""

    def http_response(self, request: urllib.request.Request, response: Any) -> Any:
        return response

    https_response = http_response


def sign_in(authorize_url: str, login: str, password: str = "x", max_steps: int = 20) -> str:
    """Act as the user's browser: open the authorization URL, sign in as `login` on the dev
    login page, accept the consent page, and follow redirects until one leaves the provider for
    the client's redirect_uri. Returns that URL (with code and state, or error) unfetched."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize_url).query)
    redirect_uri = query.get("redirect_uri", [""])[0]
    provider_origin = _origin(authorize_url)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), _NoRaise)
    url, data = authorize_url, None
    for _ in range(max_steps):
        if (redirect_uri and url.split("?")[0] == redirect_uri.split("?")[0]) or (
            _origin(url) != provider_origin
        ):
            return url
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        with opener.open(request, timeout=30) as response:
            status: int = response.status
            location = response.headers.get("Location")
            body = response.read().decode("utf-8", "replace")
        if 300 <= status < 400 and location:
            url, data = urllib.parse.urljoin(url, location), None
            continue
        if status != 200:
            raise SignInError(f"{url}: HTTP {status}\n{_text(body)}")
        form = _interaction_form(body, url)
        fields = dict(form.fields)
        if fields.get("prompt") == "login":
            fields |= {"login": login, "password": password}
        url = urllib.parse.urljoin(url, form.action)
        data = urllib.parse.urlencode(fields).encode()
    raise SignInError(f"no redirect to {redirect_uri or 'the client'} after {max_steps} steps")


def _interaction_form(body: str, url: str) -> _Form:
    parser = _FormParser()
    parser.feed(body)
    parser.close()
    forms = [f for f in parser.forms if f.method.lower() == "post"]
    # The login and consent pages each have one POST form, marked by a hidden "prompt" input.
    prompted = [f for f in forms if "prompt" in f.fields]
    if len(prompted) == 1:
        return prompted[0]
    raise SignInError(f"{url}: expected a login or consent form, got:\n{_text(body)}")


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _text(html: str, limit: int = 2000) -> str:
    """The visible text of an error page, for failure messages."""

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []
            self._skip = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag in ("script", "style"):
                self._skip += 1

        def handle_endtag(self, tag: str) -> None:
            if tag in ("script", "style") and self._skip:
                self._skip -= 1

        def handle_data(self, data: str) -> None:
            if not self._skip and data.strip():
                self.parts.append(data.strip())

    parser = Text()
    parser.feed(html)
    return " ".join(parser.parts)[:limit]
