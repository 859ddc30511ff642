"""Key providers, the keyring, and the key checks at start (pulumid.secrets.keys,
pulumid.engine.secrets.StackSecrets.check_keys).

The local key and AWS KMS run for real: AWS KMS is local-kms (tests/local_kms.py), reached by
boto3 exactly as the daemon reaches it.

Google Cloud KMS has no local server, so GCPKMSKey is tested against a loopback HTTP double
built from Google's documented request and response shapes only (it cannot show that the real
service agrees):

- the OAuth 2.0 token endpoint of a service account (RFC 7523 JWT-bearer grant;
  developers.google.com/identity/protocols/oauth2/service-account): a form POST of
  grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer and an RS256 assertion (iss =
  client_email, aud = token_uri, scope, iat/exp at most an hour apart), verified here with the
  public half of the key written to the key file -> {"access_token", "expires_in",
  "token_type"}, or 400 {"error": "invalid_grant", "error_description"};
- cryptoKeys.encrypt and cryptoKeys.decrypt (POST /v1/{name}:encrypt | :decrypt with
  `Authorization: Bearer <access token>`): {"plaintext", "additionalAuthenticatedData"} ->
  {"name", "ciphertext", ...} and {"ciphertext", "additionalAuthenticatedData"} ->
  {"plaintext", ...}, base64 fields, unknown fields refused with 400, Google's error body
  {"error": {"code", "message", "status"}}. The double really encrypts (AES-256-GCM with the
  additional authenticated data), so a wrong context fails as it would at Google: 400
  "Decryption failed: ...".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from pulumid.auth.google import ServiceAccount
from pulumid.engine.secrets import (
    LEGACY_CANARY,
    PRIMARY,
    SITE_KEY,
    MasterKeyMismatch,
    StackSecrets,
    decode_wrapped,
    stack_context,
)
from pulumid.secrets import crypto
from pulumid.secrets.keys import (
    CANARY_PREFIX,
    AWSKMSKey,
    GCPKMSKey,
    KeyNotConfigured,
    Keyring,
    KeySpec,
    KeyUnavailable,
    LocalKey,
    build_keyring,
)
from pulumid.storage.records import StackRef, WrappedKey
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner, Runner
from tests.contract.test_store import NOW, fails, ok
from tests.local_kms import LocalKMS, local_kms

T = TypeVar("T")

CONTEXT = b"pulumid/stack/7"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUDKMS_SCOPE = "https://www.googleapis.com/auth/cloudkms"
SERVICE_ACCOUNT = "pulumid-kms@acme-infra.iam.gserviceaccount.com"
GCP_KEY = "projects/acme-infra/locations/europe-west2/keyRings/pulumid/cryptoKeys/data-keys"
GCP_OTHER_KEY = "projects/acme-infra/locations/europe-west2/keyRings/pulumid/cryptoKeys/other"


# -- helpers shared with test_rotation ----------------------------------------------------


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine whose awaits all fire at once (inline store and runners)."""
    return ok(Deferred.fromCoroutine(coroutine))


def refused(coroutine: Coroutine[Any, Any, Any], kind: type[BaseException]) -> str:
    """The message of the KIND the coroutine fails with (at once)."""
    return str(fails(Deferred.fromCoroutine(coroutine), kind))


def local(master: crypto.MasterKey | None = None) -> LocalKey:
    return LocalKey(master or crypto.MasterKey.generate())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    db = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    try:
        yield db
    finally:
        db.close()


def make_stacks(store: SQLiteStore, count: int, prefix: str = "s") -> list[int]:
    return [
        ok(store.create_stack(StackRef("acme", "web", f"{prefix}{i}"), {}, NOW, None)).id
        for i in range(count)
    ]


def secrets_of(store: SQLiteStore, keyring: Keyring) -> StackSecrets:
    return StackSecrets(store, keyring, InlineRunner())


def encrypt_one(secrets_: StackSecrets, stack_id: int) -> tuple[bytes, bytes]:
    """A secret for the stack and its ciphertext."""
    plaintext = b"secret of stack %d" % stack_id
    [ciphertext] = run(secrets_.encrypt(stack_id, [plaintext]))
    return plaintext, ciphertext


def decrypts(secrets_: StackSecrets, stack_id: int, secret: tuple[bytes, bytes]) -> bool:
    return run(secrets_.decrypt(stack_id, [secret[1]])) == [secret[0]]


def stack_key_ids(store: SQLiteStore) -> dict[str, int]:
    return {k: n for k, n in ok(store.count_stack_keys()).items() if n}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's credential chain finds test credentials (local-kms does not check signatures)
    and nothing of this machine's AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- KeySpec ------------------------------------------------------------------------------

ARN = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("local", KeySpec("local", "")),
        ("  local\n", KeySpec("local", "")),
        ("file:/x", KeySpec("file", "/x")),
        ("file:relative/old.key", KeySpec("file", "relative/old.key")),
        (
            f"awskms://{ARN}?region=eu-west-2&endpoint=http://127.0.0.1:1",
            KeySpec("awskms", ARN, "eu-west-2", "http://127.0.0.1:1"),
        ),
        (f"awskms://{ARN}", KeySpec("awskms", ARN)),
        (
            "awskms://alias/pulumid?region=us-east-1",
            KeySpec("awskms", "alias/pulumid", "us-east-1"),
        ),
        (
            "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k",
            KeySpec("gcpkms", "projects/p/locations/l/keyRings/r/cryptoKeys/k"),
        ),
        (
            "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k?endpoint=http://[::1]:8",
            KeySpec(
                "gcpkms", "projects/p/locations/l/keyRings/r/cryptoKeys/k", "", "http://[::1]:8"
            ),
        ),
    ],
)
def test_key_spec_parses(text: str, spec: KeySpec) -> None:
    assert KeySpec.parse(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file:", "file: needs a path, e.g. file:/var/lib/pulumid/old.key"),
        ("awskms://", "bad key 'awskms://': want awskms://KEY?region=...&endpoint=..."),
        ("awskms://?region=eu-west-2", "bad key 'awskms://?region=eu-west-2': want awskms://KEY"),
        ("awskms://k?regoin=eu-west-2", "bad key 'awskms://k?regoin=eu-west-2': want awskms://"),
        ("gcpkms://", "bad key 'gcpkms://': want gcpkms://KEY?region=...&endpoint=..."),
        ("gcpkms://keyRings/r/cryptoKeys/k", "a gcpkms key is projects/P/locations/L/keyRings/R"),
        ("gcpkms://projects/p?token=x", "bad key 'gcpkms://projects/p?token=x'"),
        ("", "bad key '': want local, file:PATH, awskms://KEY or gcpkms://projects/..."),
        ("LOCAL", "bad key 'LOCAL': want local, file:PATH"),
        ("/etc/pulumid/master.key", "bad key '/etc/pulumid/master.key'"),
        ("vault://transit/keys/pulumid", "bad key 'vault://transit/keys/pulumid'"),
        ("awskms:arn", "bad key 'awskms:arn'"),
    ],
)
def test_key_spec_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        KeySpec.parse(text)
    assert str(info.value).startswith(message)


# -- LocalKey -----------------------------------------------------------------------------


def test_local_key_round_trip() -> None:
    key = local()
    for plaintext in (b"", b"x", os.urandom(32), os.urandom(5000)):
        wrapped = run(key.wrap(plaintext, CONTEXT))
        assert len(plaintext) < 32 or plaintext not in wrapped
        assert run(key.unwrap(wrapped, CONTEXT)) == plaintext
    # Fresh nonces: the same plaintext wraps differently each time.
    assert run(key.wrap(b"same", CONTEXT)) != run(key.wrap(b"same", CONTEXT))


def test_local_key_binds_the_context() -> None:
    key = local()
    wrapped = run(key.wrap(b"data key", CONTEXT))
    for other in (b"pulumid/stack/8", b"", CONTEXT + b"\0"):
        refused(key.unwrap(wrapped, other), crypto.DecryptionError)


def test_local_key_does_not_open_another_keys_blob() -> None:
    wrapped = run(local().wrap(b"data key", CONTEXT))
    refused(local().unwrap(wrapped, CONTEXT), crypto.DecryptionError)
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    key = local()
    refused(key.unwrap(bytes(tampered), CONTEXT), crypto.DecryptionError)


def test_local_key_id_is_a_stable_fingerprint_that_reveals_nothing() -> None:
    master = crypto.MasterKey.generate()
    key_id = LocalKey(master).key_id
    assert re.fullmatch(r"local:[0-9a-f]{16}", key_id)
    assert LocalKey(crypto.MasterKey.from_hex(master.hex())).key_id == key_id
    assert LocalKey(crypto.MasterKey.generate()).key_id != key_id
    fingerprint = key_id.removeprefix("local:")
    # Nothing of the key itself: no run of its hex, no plain hash of it.
    assert fingerprint not in master.hex()
    assert not master.hex().startswith(fingerprint[:8])
    raw = bytes.fromhex(master.hex())
    assert fingerprint not in hashlib.sha256(raw).hexdigest()
    assert fingerprint not in hashlib.sha256(master.hex().encode()).hexdigest()


def test_keyring_wraps_with_the_primary_and_unwraps_with_any() -> None:
    old, new, stranger = local(), local(), local()
    keyring = Keyring(new, [old, new])
    assert list(keyring.keys) == [new.key_id, old.key_id]
    wrapped = run(keyring.wrap(b"k", CONTEXT))
    assert wrapped.key_id == new.key_id
    assert run(keyring.unwrap(wrapped, CONTEXT)) == b"k"
    by_old = WrappedKey(old.key_id, run(old.wrap(b"o", CONTEXT)))
    assert run(keyring.unwrap(by_old, CONTEXT)) == b"o"
    by_stranger = WrappedKey(stranger.key_id, run(stranger.wrap(b"s", CONTEXT)))
    message = refused(keyring.unwrap(by_stranger, CONTEXT), KeyNotConfigured)
    assert stranger.key_id in message and "--previous-secrets-key" in message
    # A blob under a configured key's id but not its own: a decryption error, not a mix-up.
    forged = WrappedKey(old.key_id, by_stranger.wrapped)
    refused(keyring.unwrap(forged, CONTEXT), crypto.DecryptionError)


# -- AWS KMS (local-kms) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKMS]:
    with local_kms(tmp_path_factory.mktemp("local-kms")) as server:
        yield server


def aws_key(kms: LocalKMS, arn: str) -> AWSKMSKey:
    return AWSKMSKey(arn, kms.region, kms.endpoint, InlineRunner())


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_aws_kms_round_trip_and_context(kms: LocalKMS) -> None:
    arn = kms.create_key()
    key = aws_key(kms, arn)
    assert key.key_id == f"awskms:{arn}"
    data_key = crypto.new_data_key()
    wrapped = run(key.wrap(data_key, CONTEXT))
    assert data_key not in wrapped
    assert run(key.unwrap(wrapped, CONTEXT)) == data_key
    # The context is the encryption context {"pulumid": context}, as KMS itself sees it.
    client = kms.client()
    try:
        plain = client.decrypt(
            CiphertextBlob=wrapped, EncryptionContext={"pulumid": "pulumid/stack/7"}
        )
        assert plain["Plaintext"] == data_key
    finally:
        client.close()
    for other in (b"pulumid/stack/8", b""):
        refused(key.unwrap(wrapped, other), crypto.DecryptionError)


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_aws_kms_another_keys_blob_is_a_decryption_error(kms: LocalKMS) -> None:
    first, second = aws_key(kms, kms.create_key()), aws_key(kms, kms.create_key())
    wrapped = run(first.wrap(b"data key", CONTEXT))
    message = refused(second.unwrap(wrapped, CONTEXT), crypto.DecryptionError)
    assert "AWS KMS refused the ciphertext" in message
    refused(second.unwrap(b"not a kms blob", CONTEXT), crypto.DecryptionError)


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_aws_kms_unknown_key_is_unavailable_not_a_decryption_error(kms: LocalKMS) -> None:
    missing = f"arn:aws:kms:{kms.region}:{kms.account_id}:key/00000000-0000-0000-0000-000000000000"
    message = refused(aws_key(kms, missing).wrap(b"x", CONTEXT), KeyUnavailable)
    assert message.startswith("Service Unavailable: AWS KMS answered NotFoundException")


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_aws_kms_unreachable_is_key_unavailable() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    key = AWSKMSKey(ARN, "eu-west-2", endpoint, InlineRunner())
    started = time.monotonic()
    message = refused(key.wrap(b"x", CONTEXT), KeyUnavailable)
    assert message.startswith("Service Unavailable: AWS KMS unreachable:")
    assert endpoint in message
    message = refused(key.unwrap(b"blob", CONTEXT), KeyUnavailable)
    assert time.monotonic() - started < 10


# -- Google Cloud KMS (an HTTP double) ----------------------------------------------------


def google_error(code: int, message: str, status: str) -> tuple[int, dict[str, Any]]:
    return code, {"error": {"code": code, "message": message, "status": status}}


UNAUTHENTICATED = google_error(
    401,
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential.",
    "UNAUTHENTICATED",
)
DECRYPTION_FAILED = google_error(
    400, "Decryption failed: the ciphertext is invalid.", "INVALID_ARGUMENT"
)
INTERNAL = google_error(500, "Internal error encountered.", "INTERNAL")


@dataclass
class KMSCall:
    method: str  # encrypt | decrypt
    name: str
    bearer: str
    fields: list[str]
    status: int = 0


@dataclass
class FakeCloudKMS:
    """oauth2.googleapis.com/token and cloudkms.googleapis.com/v1/{name}:encrypt|decrypt."""

    client_email: str = SERVICE_ACCOUNT
    expires_in: int = 3599
    url: str = ""
    keys: dict[str, bytes] = field(default_factory=dict)  # key name -> AES-256 key
    token_claims: list[dict[str, Any]] = field(default_factory=list)  # granted assertions
    token_refusals: list[str] = field(default_factory=list)
    calls: list[KMSCall] = field(default_factory=list)
    fail_next: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    accept_tokens: bool = True  # False: every access token is refused (401)
    truncate_next: bool = False  # the next KMS answer breaks off in its body

    def __post_init__(self) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issued: set[str] = set()
        self.lock = threading.Lock()

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def add_key(self, name: str) -> str:
        self.keys[name] = AESGCM.generate_key(bit_length=256)
        return name

    def key_file(self, path: Path, key: rsa.RSAPrivateKey | None = None) -> Path:
        pem = (key or self.private_key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "acme-infra",
                    "private_key_id": secrets.token_hex(20),
                    "private_key": pem.decode(),
                    "client_email": self.client_email,
                    "client_id": "104242424242424242424",
                    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def revoke_tokens(self) -> None:
        with self.lock:
            self.issued.clear()

    # -- the token endpoint

    def token(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return 400, {"error": "invalid_request", "error_description": "Bad Request"}
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if form.get("grant_type") != JWT_BEARER:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": "Invalid grant_type",
            }
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self.private_key.public_key(),
                algorithms=["RS256"],
                audience=self.token_uri,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidTokenError as e:
            return self._refuse(f"Invalid JWT: {e}")
        if claims["iss"] != self.client_email:
            return self._refuse("Invalid issuer: " + str(claims["iss"]))
        if claims["scope"] != CLOUDKMS_SCOPE:
            return self._refuse("Invalid scope: " + str(claims["scope"]))
        if not 0 < int(claims["exp"]) - int(claims["iat"]) <= 3600:
            return self._refuse("Invalid JWT: Token must be a short-lived token (60 minutes)")
        if not int(claims["iat"]) - 60 <= time.time() < int(claims["exp"]):
            return self._refuse("Invalid JWT: the token is not valid now (iat/exp)")
        access_token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self.lock:
            self.issued.add(access_token)
            self.token_claims.append(claims)
        return 200, {
            "access_token": access_token,
            "expires_in": self.expires_in,
            "token_type": "Bearer",
        }

    def _refuse(self, why: str) -> tuple[int, dict[str, Any]]:
        self.token_refusals.append(why)
        return 400, {"error": "invalid_grant", "error_description": why}

    # -- cryptoKeys.encrypt / decrypt

    def kms(
        self, path: str, authorization: str, content_type: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        resource, _, method = unquote(path).removeprefix("/v1/").rpartition(":")
        scheme, _, bearer = authorization.partition(" ")
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        fields = sorted(request) if isinstance(request, dict) else []
        call = KMSCall(method, resource, bearer, fields)
        self.calls.append(call)
        status, answer = self._kms(call, scheme, content_type, request)
        call.status = status
        return status, answer

    def _kms(
        self, call: KMSCall, scheme: str, content_type: str, request: Any
    ) -> tuple[int, dict[str, Any]]:
        with self.lock:
            authorized = scheme == "Bearer" and call.bearer in self.issued and self.accept_tokens
            failure = self.fail_next.pop(0) if self.fail_next and authorized else None
        if not authorized:
            return UNAUTHENTICATED
        if failure is not None:
            return failure
        if call.method not in ("encrypt", "decrypt"):
            return google_error(404, "Method not found.", "NOT_FOUND")
        key = self.keys.get(call.name)
        if key is None:
            return google_error(404, f"CryptoKey {call.name} not found.", "NOT_FOUND")
        if not content_type.startswith("application/json") or not isinstance(request, dict):
            return google_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
        wanted = {"plaintext" if call.method == "encrypt" else "ciphertext"}
        known = wanted | {"additionalAuthenticatedData"}
        unknown = set(request) - known
        if unknown:
            name = sorted(unknown)[0]
            return google_error(
                400,
                f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.',
                "INVALID_ARGUMENT",
            )
        try:
            decoded = {k: base64.b64decode(str(v), validate=True) for k, v in request.items()}
        except ValueError:
            return google_error(400, "Invalid value: not base64.", "INVALID_ARGUMENT")
        if not wanted <= set(decoded):
            missing = next(iter(wanted))
            return google_error(400, f"{missing} is required.", "INVALID_ARGUMENT")
        aad = decoded.get("additionalAuthenticatedData", b"")
        if call.method == "encrypt":
            nonce = os.urandom(12)
            blob = nonce + AESGCM(key).encrypt(nonce, decoded["plaintext"], aad)
            return 200, {
                "name": f"{call.name}/cryptoKeyVersions/1",
                "ciphertext": base64.b64encode(blob).decode(),
                "protectionLevel": "SOFTWARE",
            }
        blob = decoded["ciphertext"]
        try:
            plaintext = AESGCM(key).decrypt(blob[:12], blob[12:], aad)
        except Exception:
            return DECRYPTION_FAILED
        return 200, {
            "plaintext": base64.b64encode(plaintext).decode(),
            "usedPrimary": True,
            "protectionLevel": "SOFTWARE",
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeCloudKMS


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        fake = cast(_Server, self.server).fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        content_type = self.headers.get("Content-Type") or ""
        if path == "/token":
            status, answer = fake.token(content_type, body)
        elif path.startswith("/v1/"):
            status, answer = fake.kms(
                path, self.headers.get("Authorization") or "", content_type, body
            )
        else:
            status, answer = google_error(404, "Not Found", "NOT_FOUND")
        raw = json.dumps(answer).encode()
        truncate, fake.truncate_next = fake.truncate_next and path != "/token", False
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw[: len(raw) // 2] if truncate else raw)
        self.close_connection = truncate or self.close_connection

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def google() -> Iterator[FakeCloudKMS]:
    fake = FakeCloudKMS()
    fake.add_key(GCP_KEY)
    fake.add_key(GCP_OTHER_KEY)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="fake-cloud-kms", daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def gcp_key(
    google: FakeCloudKMS, path: Path, name: str = GCP_KEY, runner: Runner | None = None
) -> GCPKMSKey:
    account = ServiceAccount.load(str(google.key_file(path / "sa.json")))
    return GCPKMSKey(name, google.url, account, runner or InlineRunner())


@pytest.mark.live
def test_gcp_kms_round_trip_with_the_documented_shapes(
    google: FakeCloudKMS, tmp_path: Path
) -> None:
    key = gcp_key(google, tmp_path)
    assert key.key_id == f"gcpkms:{GCP_KEY}"
    data_key = crypto.new_data_key()
    wrapped = run(key.wrap(data_key, CONTEXT))
    assert data_key not in wrapped
    assert run(key.unwrap(wrapped, CONTEXT)) == data_key
    assert [(c.method, c.name, c.fields, c.status) for c in google.calls] == [
        ("encrypt", GCP_KEY, ["additionalAuthenticatedData", "plaintext"], 200),
        ("decrypt", GCP_KEY, ["additionalAuthenticatedData", "ciphertext"], 200),
    ]
    # One grant, for the Cloud KMS scope, asserted by the service account to the token URI.
    [claims] = google.token_claims
    assert claims["iss"] == SERVICE_ACCOUNT
    assert claims["aud"] == google.token_uri
    assert claims["scope"] == CLOUDKMS_SCOPE
    assert "sub" not in claims  # the account acts as itself
    assert google.token_refusals == []


@pytest.mark.live
def test_gcp_kms_binds_the_context_and_the_key(google: FakeCloudKMS, tmp_path: Path) -> None:
    key = gcp_key(google, tmp_path)
    wrapped = run(key.wrap(b"data key", CONTEXT))
    message = refused(key.unwrap(wrapped, b"pulumid/stack/8"), crypto.DecryptionError)
    assert message == (
        "Google Cloud KMS refused the ciphertext: Decryption failed: the ciphertext is invalid."
    )
    other = gcp_key(google, tmp_path, GCP_OTHER_KEY)
    assert other.key_id != key.key_id
    refused(other.unwrap(wrapped, CONTEXT), crypto.DecryptionError)
    assert [c.status for c in google.calls[1:]] == [400, 400]


@pytest.mark.live
def test_gcp_kms_caches_the_access_token(google: FakeCloudKMS, tmp_path: Path) -> None:
    key = gcp_key(google, tmp_path)
    for i in range(5):
        context = b"pulumid/stack/%d" % i
        assert run(key.unwrap(run(key.wrap(b"k", context)), context)) == b"k"
    assert len(google.token_claims) == 1
    assert len({c.bearer for c in google.calls}) == 1
    assert len(google.calls) == 10


@pytest.mark.live
def test_gcp_kms_takes_a_new_token_when_the_old_one_is_about_to_expire(
    google: FakeCloudKMS, tmp_path: Path
) -> None:
    google.expires_in = 30  # within the minute of margin: never reused
    key = gcp_key(google, tmp_path)
    run(key.wrap(b"a", CONTEXT))
    run(key.wrap(b"b", CONTEXT))
    assert len(google.token_claims) == 2


@pytest.mark.live
def test_gcp_kms_a_401_refreshes_the_token_once(google: FakeCloudKMS, tmp_path: Path) -> None:
    key = gcp_key(google, tmp_path)
    wrapped = run(key.wrap(b"data key", CONTEXT))
    google.revoke_tokens()  # dropped before it expired
    assert run(key.unwrap(wrapped, CONTEXT)) == b"data key"
    assert len(google.token_claims) == 2
    assert [c.status for c in google.calls] == [200, 401, 200]
    assert google.calls[1].bearer != google.calls[2].bearer
    # Refused however fresh the token: one refresh, then unavailable (not a loop).
    google.accept_tokens = False
    message = refused(key.unwrap(wrapped, CONTEXT), KeyUnavailable)
    assert message.startswith("Service Unavailable: Google Cloud KMS answered 401")
    assert len(google.token_claims) == 3
    assert [c.status for c in google.calls[3:]] == [401, 401]


@pytest.mark.live
def test_gcp_kms_server_errors_are_key_unavailable(google: FakeCloudKMS, tmp_path: Path) -> None:
    key = gcp_key(google, tmp_path)
    wrapped = run(key.wrap(b"data key", CONTEXT))
    google.fail_next.append(INTERNAL)
    message = refused(key.wrap(b"x", CONTEXT), KeyUnavailable)
    assert (
        message == "Service Unavailable: Google Cloud KMS answered 500 Internal error encountered."
    )
    google.fail_next.append(INTERNAL)
    refused(key.unwrap(wrapped, CONTEXT), KeyUnavailable)  # not a decryption error
    google.fail_next.append(
        google_error(503, "The service is currently unavailable.", "UNAVAILABLE")
    )
    refused(key.unwrap(wrapped, CONTEXT), KeyUnavailable)
    # A 400 on encrypt is not about a ciphertext: unavailable, too.
    google.fail_next.append(google_error(400, "Invalid argument.", "INVALID_ARGUMENT"))
    refused(key.wrap(b"x", CONTEXT), KeyUnavailable)
    # An unknown key is unavailable on either side.
    missing = gcp_key(google, tmp_path, GCP_KEY + "-gone")
    assert "404" in refused(missing.wrap(b"x", CONTEXT), KeyUnavailable)
    # And the key still works once the service does.
    assert run(key.unwrap(wrapped, CONTEXT)) == b"data key"


@pytest.mark.live
def test_gcp_kms_unreachable_or_refused_account_is_key_unavailable(
    google: FakeCloudKMS, tmp_path: Path
) -> None:
    # The token endpoint refuses an assertion signed by a key it does not know.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = ServiceAccount.load(str(google.key_file(tmp_path / "wrong.json", stranger)))
    key = GCPKMSKey(GCP_KEY, google.url, account, InlineRunner())
    message = refused(key.wrap(b"x", CONTEXT), KeyUnavailable)
    assert message == "Service Unavailable: Google refused the service account (400)"
    assert google.token_refusals and google.calls == []
    # KMS itself unreachable (the token endpoint answers).
    account = ServiceAccount.load(str(google.key_file(tmp_path / "sa.json")))
    nowhere = GCPKMSKey(GCP_KEY, f"http://127.0.0.1:{free_port()}", account, InlineRunner())
    message = refused(nowhere.wrap(b"x", CONTEXT), KeyUnavailable)
    assert message.startswith("Service Unavailable: http://127.0.0.1:")


@pytest.mark.live
def test_gcp_kms_a_broken_off_answer_is_key_unavailable(
    google: FakeCloudKMS, tmp_path: Path
) -> None:
    key = gcp_key(google, tmp_path)
    run(key.wrap(b"warm up the token", CONTEXT))
    google.truncate_next = True
    refused(key.wrap(b"x", CONTEXT), KeyUnavailable)


@pytest_twisted.ensureDeferred
@pytest.mark.live
async def test_gcp_kms_on_threads_off_the_reactor(google: FakeCloudKMS, tmp_path: Path) -> None:
    """As the daemon runs it: the blocking calls on threads, awaited on the reactor."""

    class Threads(Runner):
        def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return deferToThread(f, *args, **kwargs)

    key = gcp_key(google, tmp_path, runner=Threads())
    wrapped = await key.wrap(b"data key", CONTEXT)
    assert await key.unwrap(wrapped, CONTEXT) == b"data key"
    with pytest.raises(crypto.DecryptionError):
        await key.unwrap(wrapped, b"elsewhere")


# -- build_keyring ------------------------------------------------------------------------


def test_build_keyring_local_needs_the_master_key(tmp_path: Path) -> None:
    master = crypto.MasterKey.generate()
    keyring = build_keyring("local", [], master, InlineRunner())
    assert isinstance(keyring.primary, LocalKey)
    assert keyring.primary.key_id == LocalKey(master).key_id
    with pytest.raises(ValueError, match="the key 'local' needs the master key"):
        build_keyring("local", [], None, InlineRunner())
    with pytest.raises(ValueError, match="the key 'local' needs the master key"):
        (tmp_path / "k").write_text(crypto.MasterKey.generate().hex())
        build_keyring(f"file:{tmp_path / 'k'}", ["local"], None, InlineRunner())


def test_build_keyring_reads_key_files(tmp_path: Path) -> None:
    master, old = crypto.MasterKey.generate(), crypto.MasterKey.generate()
    (tmp_path / "old.key").write_text(old.hex() + "\n")
    keyring = build_keyring(
        "local", [f"file:{tmp_path / 'old.key'}", "local"], master, InlineRunner()
    )
    assert keyring.primary.key_id == LocalKey(master).key_id
    assert list(keyring.keys) == [LocalKey(master).key_id, LocalKey(old).key_id]
    assert {k.key_id for k in keyring.local_keys()} == set(keyring.keys)
    # A key file alone, without a master key.
    alone = build_keyring(f"file:{tmp_path / 'old.key'}", [], None, InlineRunner())
    assert alone.primary.key_id == LocalKey(old).key_id


def test_build_keyring_names_a_bad_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(ValueError) as info:
        build_keyring(f"file:{missing}", [], None, InlineRunner())
    assert str(info.value) == f"cannot read the key file {missing}: No such file or directory"
    for content in ("not hex at all", "ab" * 16, "zz" * 32):
        bad = tmp_path / "bad.key"
        bad.write_text(content)
        with pytest.raises(ValueError) as info:
            build_keyring("local", [f"file:{bad}"], crypto.MasterKey.generate(), InlineRunner())
        assert str(info.value).startswith(f"bad key file {bad}: master key must ")
        assert content not in str(info.value)
    with pytest.raises(ValueError, match="cannot read the key file"):
        build_keyring(f"file:{tmp_path}", [], None, InlineRunner())  # a directory


def test_build_keyring_refuses_bad_specs() -> None:
    with pytest.raises(ValueError, match="bad key 'vault://x'"):
        build_keyring("local", ["vault://x"], crypto.MasterKey.generate(), InlineRunner())


def test_build_keyring_gcpkms_needs_credentials(
    google_free_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = f"gcpkms://{GCP_KEY}?endpoint=http://127.0.0.1:1"
    with pytest.raises(ValueError) as info:
        build_keyring(spec, [], None, InlineRunner())
    assert str(info.value) == (
        "a gcpkms key needs a service account key file: --gcp-credentials-file"
    )
    with pytest.raises(ValueError, match="cannot read"):
        build_keyring(spec, [], None, InlineRunner(), str(tmp_path / "absent.json"))
    (tmp_path / "notjson").write_text("{")
    with pytest.raises(ValueError, match="is not a JSON key file"):
        build_keyring(spec, [], None, InlineRunner(), str(tmp_path / "notjson"))
    # From the file given, or else GOOGLE_APPLICATION_CREDENTIALS.
    fake = FakeCloudKMS(url="http://127.0.0.1:1")
    path = str(fake.key_file(tmp_path / "sa.json"))
    keyring = build_keyring(spec, [], None, InlineRunner(), path)
    assert isinstance(keyring.primary, GCPKMSKey)
    assert keyring.primary.key_id == f"gcpkms:{GCP_KEY}"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", path)
    assert build_keyring(spec, [], None, InlineRunner()).primary.key_id == f"gcpkms:{GCP_KEY}"


@pytest.fixture
def google_free_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


@pytest.mark.live
def test_build_keyring_gcpkms_works_end_to_end(google: FakeCloudKMS, tmp_path: Path) -> None:
    path = str(google.key_file(tmp_path / "sa.json"))
    master = crypto.MasterKey.generate()
    keyring = build_keyring(
        f"gcpkms://{GCP_KEY}?endpoint={google.url}", ["local"], master, InlineRunner(), path
    )
    wrapped = run(keyring.wrap(b"data key", CONTEXT))
    assert wrapped.key_id == f"gcpkms:{GCP_KEY}"
    assert run(keyring.unwrap(wrapped, CONTEXT)) == b"data key"


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_build_keyring_awskms(kms: LocalKMS) -> None:
    arn = kms.create_key()
    spec = f"awskms://{arn}?region={kms.region}&endpoint={kms.endpoint}"
    keyring = build_keyring(spec, [], None, InlineRunner())
    assert isinstance(keyring.primary, AWSKMSKey) and keyring.primary.key_id == f"awskms:{arn}"
    wrapped = run(keyring.wrap(b"data key", CONTEXT))
    assert run(keyring.unwrap(wrapped, CONTEXT)) == b"data key"


# -- StackSecrets.check_keys --------------------------------------------------------------


def test_first_start_stores_a_canary_per_key(store: SQLiteStore) -> None:
    primary, previous = local(), local()
    assert ok(store.get_meta(CANARY_PREFIX + primary.key_id)) is None
    run(secrets_of(store, Keyring(primary, [previous])).check_keys())
    for key in (primary, previous):
        canary = ok(store.get_meta(CANARY_PREFIX + key.key_id))
        assert canary is not None and b"canary" not in canary
    assert ok(store.get_meta(PRIMARY)) == primary.key_id.encode()
    # The same keys start again; and the canaries are not replaced.
    before = ok(store.get_meta(CANARY_PREFIX + primary.key_id))
    run(secrets_of(store, Keyring(primary, [previous])).check_keys())
    assert ok(store.get_meta(CANARY_PREFIX + primary.key_id)) == before


def test_another_master_key_alone_is_refused(store: SQLiteStore) -> None:
    original = local()
    first = secrets_of(store, Keyring(original))
    run(first.check_keys())
    [stack] = make_stacks(store, 1)
    secret = encrypt_one(first, stack)
    run(first.site_key())
    stranger = local()
    message = refused(secrets_of(store, Keyring(stranger)).check_keys(), MasterKeyMismatch)
    assert message.startswith(f"1 stacks' data keys are wrapped by {original.key_id}, which is")
    assert stranger.key_id not in message
    # Refused before the stranger was recorded as the primary; the data is untouched.
    assert ok(store.get_meta(PRIMARY)) == original.key_id.encode()
    again = secrets_of(store, Keyring(original))
    run(again.check_keys())
    assert decrypts(again, stack, secret)


def test_a_site_key_under_a_missing_key_is_refused(store: SQLiteStore) -> None:
    original = local()
    first = secrets_of(store, Keyring(original))
    run(first.check_keys())
    run(first.site_key())  # no stacks yet
    message = refused(secrets_of(store, Keyring(local())).check_keys(), MasterKeyMismatch)
    assert message.startswith(f"the site key is wrapped by {original.key_id}, which is not")


def test_a_new_primary_with_the_old_key_as_previous_starts(store: SQLiteStore) -> None:
    old, new = local(), local()
    first = secrets_of(store, Keyring(old))
    run(first.check_keys())
    stacks = make_stacks(store, 3)
    saved = {s: encrypt_one(first, s) for s in stacks}
    site = run(first.site_key())
    second = secrets_of(store, Keyring(new, [old]))
    run(second.check_keys())
    assert ok(store.get_meta(PRIMARY)) == new.key_id.encode()
    assert ok(store.get_meta(CANARY_PREFIX + new.key_id)) is not None
    assert all(decrypts(second, s, saved[s]) for s in stacks)
    assert run(second.site_key()) == site
    # New stacks get data keys under the new primary; the old ones keep theirs.
    [fresh] = make_stacks(store, 1, "new")
    secret = encrypt_one(second, fresh)
    assert stack_key_ids(store) == {old.key_id: 3, new.key_id: 1}
    assert decrypts(second, fresh, secret)


def legacy_database(store: SQLiteStore, master: crypto.MasterKey, count: int) -> dict[int, Any]:
    """What pulumid wrote before key ids: data keys wrapped by the master key (key_id ''),
    the master key canary, secrets encrypted with the data keys."""
    ok(store.put_meta(LEGACY_CANARY, crypto.make_canary(master)))
    saved: dict[int, tuple[bytes, bytes]] = {}
    for stack in make_stacks(store, count, "legacy"):
        data_key = crypto.new_data_key()
        wrapped = crypto.wrap_data_key(master, data_key, context=stack_context(stack))
        ok(store.put_stack_key_if_absent(stack, WrappedKey("", wrapped)))
        plaintext = b"legacy secret %d" % stack
        [ciphertext] = crypto.encrypt_many(data_key, [plaintext], context=stack_context(stack))
        saved[stack] = (plaintext, ciphertext)
    return saved


def test_a_legacy_database_is_adopted(store: SQLiteStore) -> None:
    master = crypto.MasterKey.generate()
    saved = legacy_database(store, master, 7)
    assert stack_key_ids(store) == {"": 7}
    key = LocalKey(master)
    secrets_ = secrets_of(store, Keyring(key))
    run(secrets_.check_keys())
    assert stack_key_ids(store) == {key.key_id: 7}
    assert all(decrypts(secrets_, s, saved[s]) for s in saved)
    # Adopted as they were: the wrapped bytes did not change, only their name.
    for stack in saved:
        stored = ok(store.get_stack_key(stack))
        assert stored is not None and stored.key_id == key.key_id
    # Later starts find nothing left to adopt, and the legacy canary still checks the key.
    run(secrets_of(store, Keyring(key)).check_keys())
    assert stack_key_ids(store) == {key.key_id: 7}


def test_a_legacy_database_is_adopted_by_a_previous_local_key(store: SQLiteStore) -> None:
    """Rotating away from the master key at the first start with key ids: the old master key
    given as a previous key (file:) still adopts the rows."""
    master = crypto.MasterKey.generate()
    saved = legacy_database(store, master, 3)
    keyring = Keyring(local(), [LocalKey(master)])
    secrets_ = secrets_of(store, keyring)
    run(secrets_.check_keys())
    assert stack_key_ids(store) == {LocalKey(master).key_id: 3}
    assert all(decrypts(secrets_, s, saved[s]) for s in saved)


def test_a_legacy_database_with_the_wrong_key_is_refused(
    store: SQLiteStore, tmp_path: Path
) -> None:
    master = crypto.MasterKey.generate()
    legacy_database(store, master, 2)
    message = refused(secrets_of(store, Keyring(local())).check_keys(), MasterKeyMismatch)
    assert "does not match" in message
    assert stack_key_ids(store) == {"": 2}
    # An empty legacy database (a canary, no stacks and no site key yet) is refused as well.
    empty = SQLiteStore.open(tmp_path / "empty.sqlite", InlineRunner())
    try:
        ok(empty.put_meta(LEGACY_CANARY, crypto.make_canary(master)))
        message = refused(secrets_of(empty, Keyring(local())).check_keys(), MasterKeyMismatch)
        assert "does not match" in message
        run(secrets_of(empty, Keyring(LocalKey(master))).check_keys())
    finally:
        empty.close()


def test_a_corrupted_canary_is_refused(store: SQLiteStore) -> None:
    primary, previous = local(), local()
    run(secrets_of(store, Keyring(primary, [previous])).check_keys())
    name = CANARY_PREFIX + previous.key_id
    canary = ok(store.get_meta(name))
    assert canary is not None
    flipped = bytearray(canary)
    flipped[-1] ^= 0x80
    ok(store.put_meta(name, bytes(flipped)))
    message = refused(
        secrets_of(store, Keyring(primary, [previous])).check_keys(), MasterKeyMismatch
    )
    assert message == f"the key {previous.key_id} does not open its stored canary"
    # A canary wrapped by another key under this key's name: refused the same way.
    ok(store.put_meta(name, run(local().wrap(b"pulumid key canary", b"pulumid/key-canary/v1"))))
    refused(secrets_of(store, Keyring(previous)).check_keys(), MasterKeyMismatch)
    # Undecodable junk too.
    ok(store.put_meta(CANARY_PREFIX + primary.key_id, b"junk"))
    refused(secrets_of(store, Keyring(primary)).check_keys(), MasterKeyMismatch)


def test_site_key_round_trip(store: SQLiteStore) -> None:
    key = local()
    secrets_ = secrets_of(store, Keyring(key))
    site = run(secrets_.site_key())
    assert len(site) == crypto.KEY_SIZE
    assert run(secrets_of(store, Keyring(key)).site_key()) == site
    stored = ok(store.get_meta(SITE_KEY))
    assert stored is not None and decode_wrapped(stored).key_id == key.key_id
