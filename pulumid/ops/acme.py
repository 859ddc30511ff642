"""Certificates from an ACME v2 CA (HTTP-01), issued and renewed while the daemon serves.

The account key and the certificate (with its key) live in the database, so a restart or
another node serves them at once and backups carry them. One node at a time issues (a claim
in the store); every node picks up what is stored. The blocking ACME client (`acme` from
PyPI) runs in a thread; the HTTP-01 answers are served on the plain listener
(`--acme-http-listen`) from memory and from the store, so any node can answer the CA.

Renewal: 30 days before expiry (`--acme-renew-days`), or once two-thirds of a short
lifetime has passed, whichever is first. A failed issuance is logged with the CA's reason,
shown by /readyz while no valid certificate is served, and retried at the next check.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from pulumid.ops.tls import SwappableTLS
from pulumid.storage.interface import Store

T = TypeVar("T")

log = Logger()

ACCOUNT_KEY = "acme.account_key"
CERTIFICATE = "acme.certificate"
CHALLENGE = "acme.challenge."
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DAY = 86400.0


@dataclass(frozen=True)
class Issued:
    fullchain_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.fullchain_pem)

    def due(self, now: float, renew_days: float) -> bool:
        cert = self.certificate
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        return now >= min(end - renew_days * DAY, start + (end - start) * 2 / 3)

    def covers(self, names: list[str]) -> bool:
        try:
            san = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return False
        have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
        have |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
        return set(names) <= have

    def dump(self) -> bytes:
        return json.dumps(
            {"fullchain": self.fullchain_pem.decode(), "key": self.key_pem.decode()}
        ).encode()

    @classmethod
    def load(cls, raw: bytes) -> Issued:
        data = json.loads(raw)
        return cls(data["fullchain"].encode(), data["key"].encode())


class Challenges(Resource):
    """GET /.well-known/acme-challenge/<token> on the plain listener."""

    isLeaf = True

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.answers: dict[str, bytes] = {}

    def render_GET(self, request: Any) -> Any:
        prefix = b"/.well-known/acme-challenge/"
        if not request.path.startswith(prefix):
            request.setResponseCode(404)
            return b"not an ACME challenge\n"
        token = request.path[len(prefix) :].decode("ascii", "replace")
        if token in self.answers:
            return self.answers[token]
        d = self.store.get_meta(CHALLENGE + token)

        def found(value: bytes | None) -> None:
            if value:
                request.write(value)
            else:
                request.setResponseCode(404)
            request.finish()

        d.addCallback(found)
        d.addErrback(lambda f: (request.setResponseCode(503), request.finish()))
        from twisted.web.server import NOT_DONE_YET

        return NOT_DONE_YET


@dataclass(frozen=True)
class Settings:
    directory: str
    names: tuple[str, ...]
    email: str
    renew_days: float
    ca_file: str  # trusted for the directory's own TLS ("" : the system's)


class ACME:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: IReactorTime,
        tls: SwappableTLS,
        challenges: Challenges,
        node: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.tls = tls
        self.challenges = challenges
        self.node = node
        self.served: Issued | None = None
        self.last_error = ""
        self.issued_count = 0

    def problem(self) -> str | None:
        """Why this node cannot serve a valid certificate now (readiness), or None."""
        if self.served is None:
            return f"no certificate yet: {self.last_error or 'being issued'}"
        if self.served.certificate.not_valid_after_utc.timestamp() <= self.clock.seconds():
            return f"the certificate has expired: {self.last_error or 'renewal pending'}"
        return None

    async def check(self) -> None:
        """Serve what is stored; issue (one node at a time) when nothing usable is stored."""
        names = list(self.settings.names)
        stored = await self.store.get_meta(CERTIFICATE)
        issued = Issued.load(stored) if stored else None
        if issued is not None and issued != self.served and issued.covers(names):
            self._serve(issued)
        now = self.clock.seconds()
        if (
            issued is not None
            and issued.covers(names)
            and not issued.due(now, self.settings.renew_days)
        ):
            return
        if not await self.store.claim("acme-issue", self.node, now, now + 300):
            return
        try:
            fresh = await self._issue()
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.error(
                "ACME: no certificate for {names}: {error}", names=names, error=self.last_error
            )
            return
        finally:
            # Done: another node (or this one after a restart) may issue next time.
            await self.store.claim("acme-issue", self.node, now, now)
        await self.store.put_meta(CERTIFICATE, fresh.dump())
        self.last_error = ""
        self.issued_count += 1
        self._serve(fresh)
        log.info(
            "ACME: certificate for {names} issued, valid until {until}",
            names=names,
            until=fresh.certificate.not_valid_after_utc.isoformat(),
        )

    def _serve(self, issued: Issued) -> None:
        self.tls.use(issued.fullchain_pem, issued.key_pem)
        self.served = issued

    async def _issue(self) -> Issued:
        account_pem = await self.store.get_meta(ACCOUNT_KEY)
        if account_pem is None:
            fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = fresh.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            account_pem = await self.store.set_meta_if_absent(ACCOUNT_KEY, pem)
        published: dict[str, bytes] = {}

        def publish(token: str, validation: str) -> None:
            published[token] = validation.encode()

        # The thread collects the challenges; the reactor publishes them before answering.
        order = await _off_the_pool(_begin, self.settings, account_pem, publish)
        for token, validation in published.items():
            self.challenges.answers[token] = validation
            await self.store.put_meta(CHALLENGE + token, validation)
        try:
            return await _off_the_pool(_finish, order)
        finally:
            for token in published:
                self.challenges.answers.pop(token, None)
                await self.store.put_meta(CHALLENGE + token, b"")


def _off_the_pool(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """F(*ARGS) on a daemon thread of its own. Not the reactor's pool: shutdown joins that
    pool, and an order polling the CA for up to 90 s would hold up SIGTERM. An order cut
    short by the exit is abandoned at the CA; the next start orders again."""
    from twisted.internet import reactor

    d: Deferred[T] = Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)  # type: ignore[attr-defined]
        else:
            reactor.callFromThread(d.callback, result)  # type: ignore[attr-defined]

    threading.Thread(target=run, name="acme", daemon=True).start()
    return d


@dataclass
class _Order:
    client: Any
    order: Any
    answers: list[tuple[Any, Any]]
    key_pem: bytes


def _begin(settings: Settings, account_pem: bytes, publish: Any) -> _Order:
    """On a thread: account, order, and the HTTP-01 answers to publish."""
    import josepy
    from acme import challenges, client, crypto_util, errors, messages

    key = serialization.load_pem_private_key(account_pem, password=None)
    jwk = josepy.JWKRSA(key=key)
    verify: Any = settings.ca_file or True
    net = client.ClientNetwork(jwk, user_agent="pulumid", verify_ssl=verify, timeout=30)
    directory = client.ClientV2.get_directory(settings.directory, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=settings.email or None, terms_of_service_agreed=True
    )
    try:
        acme.new_account(registration)
    except errors.ConflictError as existing:
        regr = messages.RegistrationResource(body=messages.Registration(), uri=existing.location)
        net.account = acme.query_registration(regr)
    cert_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = cert_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    domains, ips = [], []
    for name in settings.names:
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            domains.append(name)
    csr = crypto_util.make_csr(key_pem, domains or None, ipaddrs=ips or None)
    order = acme.new_order(csr)
    answers = []
    for authz in order.authorizations:
        challenge = next(
            (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
        )
        if challenge is None:
            raise RuntimeError(f"the CA offers no HTTP-01 challenge for {authz.body.identifier}")
        response, validation = challenge.response_and_validation(jwk)
        publish(challenge.chall.encode("token"), validation)
        answers.append((challenge, response))
    return _Order(acme, order, answers, key_pem)


def _finish(pending: _Order) -> Issued:
    """On a thread: answer the challenges, wait for the CA, fetch the certificate."""
    import datetime

    for challenge, response in pending.answers:
        pending.client.answer_challenge(challenge, response)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=90)
    order = pending.client.poll_and_finalize(pending.order, deadline=deadline)
    return Issued(order.fullchain_pem.encode(), pending.key_pem)
