"""Browser sign-in for `pulumi login` (the CLI's /cli-login flow, with PULUMI_CONSOLE_DOMAIN
pointing at pulumid): to the identity provider and back, then to the CLI's loopback port."""

from __future__ import annotations

import html
from urllib.parse import urlencode

from twisted.web.iweb import IRequest

from pulumid.api.base import Routes, query, route
from pulumid.auth.access import PUBLIC
from pulumid.auth.oidc import COOKIE, STATE_SECONDS, CLISession, SignIn, SignInRefused
from pulumid.auth.people import People
from pulumid.auth.principal import Principal
from pulumid.errors import BadRequest, NotFound, PulumidError

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>pulumid</title></head>
<body style="font-family: sans-serif; margin: 4em"><h1>{title}</h1><p>{text}</p></body></html>"""


class LoginRoutes(Routes):
    def _people(self) -> People:
        people: People | None = self.auth.people
        if people is None:
            raise NotFound(
                "Not Found: browser sign-in needs --auth-mode oidc or google; "
                "log in with an access token instead"
            )
        return people

    @route("/cli-login", "GET", PUBLIC)
    async def cli_login(self, request: IRequest) -> bytes:
        people = self._people()
        args = query(request)
        port, nonce = args.get("cliSessionPort", ""), args.get("cliSessionNonce", "")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequest("Bad Request: cliSessionPort must be a port number")
        if not nonce or len(nonce) > 256:
            raise BadRequest("Bad Request: cliSessionNonce is required")
        description = args.get("cliSessionDescription", "")[:200]
        url, binding = await people.client.begin(CLISession(int(port), nonce, description))
        secure = "; Secure" if people.client.settings.public_url.startswith("https:") else ""
        request.setHeader(
            b"set-cookie",
            f"{COOKIE}={binding}; Path=/login; Max-Age={int(STATE_SECONDS)}; HttpOnly; "
            f"SameSite=Lax{secure}".encode(),
        )
        return self._redirect(request, url)

    @route("/login/callback", "GET", PUBLIC)
    async def callback(self, request: IRequest) -> bytes:
        people = self._people()
        args = query(request)
        if args.get("error"):
            why = args.get("error_description") or args["error"]
            self._audit(request, None, "user.signin", {}, 403, f"provider: {why}")
            raise SignInRefused(f"Forbidden: the identity provider refused the sign-in: {why}")
        code, state = args.get("code", ""), args.get("state", "")
        if not code or not state:
            raise BadRequest("Bad Request: the provider sent no code or state")
        binding = (request.getCookie(COOKIE.encode()) or b"").decode("latin-1")
        try:
            sign_in = await people.with_groups(await people.client.finish(code, state, binding))
            if self.auth.multi_user and not self.auth.access.policy.organizations_of(
                _as_principal(sign_in)
            ):
                raise SignInRefused(
                    f"Forbidden: {sign_in.login} has no role in any organization; "
                    "ask an administrator to add you to the RBAC file"
                )
            token = await people.signed_in(sign_in)
        except PulumidError as e:
            self._audit(request, None, "user.signin", {}, e.status, e.message)
            raise
        self.auth.audit.record(
            org="",
            actor=sign_in.login,
            action="user.signin",
            resource=sign_in.login,
            status=302,
            client_ip=self.auth.client_ip(request),
            description="browser sign-in for the CLI",
        )
        query_string = urlencode({"accessToken": token, "nonce": sign_in.cli.nonce})
        return self._redirect(request, f"http://127.0.0.1:{sign_in.cli.port}/?{query_string}")

    @route("/welcome/cli", "GET", PUBLIC)
    def welcome(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _PAGE.format(
            title="You are signed in",
            text=html.escape("The pulumi CLI has its token: you can close this page."),
        ).encode()

    @staticmethod
    def _redirect(request: IRequest, url: str) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", url.encode())
        request.setHeader(b"cache-control", b"no-store")
        return b""


def _as_principal(sign_in: SignIn) -> Principal:
    return Principal(
        "user",
        sign_in.login,
        name=sign_in.name,
        email=sign_in.email,
        groups=frozenset(sign_in.groups),
    )
