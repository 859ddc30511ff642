"""Key providers and the keyring: what wraps each stack's data key.

A provider encrypts small values (data keys, canaries) under a key it holds or reaches: the
local master key, an AWS KMS key, a Google Cloud KMS key. Each has a key id stored beside
everything it wraps, so any configured key unwraps what it wrapped, and rotation (a new
primary, the old ones kept as previous keys) re-wraps data keys while the daemon serves.

Key specs, as --secrets-key and --previous-secrets-key take them:
    local                              the master key (--master-key / --master-key-file)
    file:/path/to/key                  another local key: 64 hex characters in a file
    awskms://KEY?region=R&endpoint=U   an AWS KMS key: id, ARN or alias (credentials: AWS chain)
    gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K?endpoint=U
                                       a Google Cloud KMS key (credentials: a service
                                       account key file, --gcp-credentials-file)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from pulumid.auth.google import GRANT, ServiceAccount, granted, service_account_assertion
from pulumid.errors import Unavailable
from pulumid.secrets import crypto
from pulumid.storage.records import WrappedKey
from pulumid.threads import Runner

CANARY_PREFIX = "key_canary:"
CANARY_CONTEXT = b"pulumid/key-canary/v1"
CANARY_PLAINTEXT = b"pulumid key canary"
GCP_KMS = "https://cloudkms.googleapis.com"
GCP_SCOPE = "https://www.googleapis.com/auth/cloudkms"

TIMEOUT = 15.0


class KeyUnavailable(Unavailable):
    """A key provider could not be reached or refused: a retry may succeed."""


class KeyNotConfigured(Exception):
    """A stored value names a key this node was not given."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"a stored data key is wrapped by {key_id!r}, which is not configured: give it "
            "with --previous-secrets-key (or PULUMID_PREVIOUS_SECRETS_KEYS)"
        )
        self.key_id = key_id


class KeyProvider(ABC):
    key_id: str

    @abstractmethod
    async def wrap(self, plaintext: bytes, context: bytes) -> bytes: ...

    @abstractmethod
    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Raises crypto.DecryptionError when the blob is not this key's (or was altered)."""


def local_key_id(master: crypto.MasterKey) -> str:
    # A fingerprint that names the key without revealing it.
    digest = hmac.new(master.derive(b"pulumid key id"), b"", hashlib.sha256).hexdigest()
    return f"local:{digest[:16]}"


class LocalKey(KeyProvider):
    def __init__(self, master: crypto.MasterKey) -> None:
        self.master = master
        self.key_id = local_key_id(master)

    async def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        return crypto.seal_with_master(self.master, plaintext, context)

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return crypto.open_with_master(self.master, wrapped, context)


class AWSKMSKey(KeyProvider):
    """boto3's blocking client, called on a thread. The context is the encryption context."""

    def __init__(self, key: str, region: str, endpoint: str | None, runner: Runner) -> None:
        import boto3  # imported when used: botocore is slow to import

        self.key = key
        self.key_id = f"awskms:{key}"
        self._runner = runner
        self._client = boto3.client("kms", region_name=region or None, endpoint_url=endpoint)

    async def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        answer = await self._runner.run(self._call, "encrypt", Plaintext=plaintext, context=context)
        return bytes(answer["CiphertextBlob"])

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        answer = await self._runner.run(
            self._call, "decrypt", CiphertextBlob=wrapped, context=context
        )
        return bytes(answer["Plaintext"])

    def _call(self, operation: str, *, context: bytes, **args: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, operation)(  # type: ignore[no-any-return]
                KeyId=self.key, EncryptionContext={"pulumid": context.decode()}, **args
            )
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise crypto.DecryptionError(f"AWS KMS refused the ciphertext ({code})") from None
            raise KeyUnavailable(f"Service Unavailable: AWS KMS answered {code}") from None
        except BotoCoreError as e:
            raise KeyUnavailable(f"Service Unavailable: AWS KMS unreachable: {e}") from None


class GCPKMSKey(KeyProvider):
    """Cloud KMS's REST API (cryptoKeys.encrypt / decrypt; the context as additional
    authenticated data) with an access token of a service account. Blocking HTTP on the
    runner's threads, like AWS KMS, so the same key also serves the checks at start."""

    def __init__(self, name: str, endpoint: str, account: ServiceAccount, runner: Runner) -> None:
        self.name = name
        self.key_id = f"gcpkms:{name}"
        self._endpoint = (endpoint or GCP_KMS).rstrip("/")
        self._account = account
        self._runner = runner
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    async def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        body = {"plaintext": _b64(plaintext), "additionalAuthenticatedData": _b64(context)}
        answer = await self._runner.run(self._call, "encrypt", body)
        return _unb64(answer, "ciphertext")

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        body = {"ciphertext": _b64(wrapped), "additionalAuthenticatedData": _b64(context)}
        answer = await self._runner.run(self._call, "decrypt", body)
        return _unb64(answer, "plaintext")

    def _call(self, method: str, body: dict[str, str]) -> dict[str, Any]:
        url = f"{self._endpoint}/v1/{quote(self.name, safe='/')}:{method}"
        status, answer = _post_json(url, body, {"Authorization": f"Bearer {self._access()}"})
        if status == 401:  # the token was dropped early: another, once
            with self._lock:
                self._token = None
            status, answer = _post_json(url, body, {"Authorization": f"Bearer {self._access()}"})
        if status == 200 and isinstance(answer, dict):
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message", "") if isinstance(error, dict) else ""
        if method == "decrypt" and status == 400:
            raise crypto.DecryptionError(f"Google Cloud KMS refused the ciphertext: {message}")
        raise KeyUnavailable(f"Service Unavailable: Google Cloud KMS answered {status} {message}")

    def _access(self) -> str:
        with self._lock:
            now = time.time()
            if self._token is not None and self._token[1] > now + 60:
                return self._token[0]
            assertion = service_account_assertion(self._account, GCP_SCOPE, now)
            status, answer = _post(
                self._account.token_uri,
                urlencode({"grant_type": GRANT, "assertion": assertion}).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"},
            )
            self._token = granted(status, answer, now)
            if self._token is None:
                raise KeyUnavailable(
                    f"Service Unavailable: Google refused the service account ({status})"
                )
            return self._token[0]


def _post_json(url: str, body: Any, headers: Mapping[str, str]) -> tuple[int, Any]:
    return _post(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


def _post(url: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise KeyUnavailable(f"Service Unavailable: {url.split('/v1/')[0]}: {e}") from None
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(body: dict[str, Any], field: str) -> bytes:
    try:
        return base64.b64decode(str(body[field]), validate=True)
    except (KeyError, binascii.Error, ValueError):
        raise KeyUnavailable(f"Service Unavailable: Google Cloud KMS sent no {field}") from None


@dataclass(frozen=True)
class KeySpec:
    """A parsed key spec (see the module docstring)."""

    kind: str  # local | file | awskms | gcpkms
    name: str  # file path, KMS key, or '' for local
    region: str = ""
    endpoint: str = ""

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        text = text.strip()
        if text == "local":
            return cls("local", "")
        if text.startswith("file:"):
            path = text[len("file:") :]
            if not path:
                raise ValueError("file: needs a path, e.g. file:/var/lib/pulumid/old.key")
            return cls("file", path)
        for kind in ("awskms", "gcpkms"):
            if text.startswith(f"{kind}://"):
                rest = urlsplit(text)
                name = text[len(kind) + 3 :].split("?", 1)[0]
                query = {k: v[-1] for k, v in parse_qs(rest.query).items()}
                unknown = set(query) - {"region", "endpoint"}
                if not name or unknown:
                    raise ValueError(f"bad key {text!r}: want {kind}://KEY?region=...&endpoint=...")
                if kind == "gcpkms" and not name.startswith("projects/"):
                    raise ValueError(
                        "a gcpkms key is projects/P/locations/L/keyRings/R/cryptoKeys/K"
                    )
                return cls(kind, name, query.get("region", ""), query.get("endpoint", ""))
        raise ValueError(
            f"bad key {text!r}: want local, file:PATH, awskms://KEY or gcpkms://projects/..."
        )


class Keyring:
    """The primary key wraps; any configured key unwraps what names it."""

    def __init__(self, primary: KeyProvider, previous: Sequence[KeyProvider] = ()) -> None:
        self.primary = primary
        self.keys: dict[str, KeyProvider] = {primary.key_id: primary}
        for key in previous:
            self.keys.setdefault(key.key_id, key)

    def get(self, key_id: str) -> KeyProvider:
        key = self.keys.get(key_id)
        if key is None:
            raise KeyNotConfigured(key_id)
        return key

    async def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        return WrappedKey(self.primary.key_id, await self.primary.wrap(plaintext, context))

    async def unwrap(self, key: WrappedKey, context: bytes) -> bytes:
        return await self.get(key.key_id).unwrap(key.wrapped, context)

    def local_keys(self) -> list[LocalKey]:
        return [key for key in self.keys.values() if isinstance(key, LocalKey)]


def build_keyring(
    primary: str,
    previous: Sequence[str],
    master: crypto.MasterKey | None,
    runner: Runner,
    gcp_credentials_file: str = "",
) -> Keyring:
    """The keyring of a daemon (or admin command) from its key specs. RUNNER runs the
    blocking KMS calls (an InlineRunner for checks before the reactor runs)."""

    def provider(text: str) -> KeyProvider:
        spec = KeySpec.parse(text)
        if spec.kind == "local":
            if master is None:
                raise ValueError("the key 'local' needs the master key")
            return LocalKey(master)
        if spec.kind == "file":
            try:
                return LocalKey(crypto.MasterKey.from_hex(Path(spec.name).read_text()))
            except OSError as e:
                raise ValueError(f"cannot read the key file {spec.name}: {e.strerror}") from None
            except crypto.InvalidMasterKey as e:
                raise ValueError(f"bad key file {spec.name}: {e}") from None
            except UnicodeDecodeError:  # the message would show a byte of the key
                raise ValueError(f"bad key file {spec.name}: not 64 hex characters") from None
        if spec.kind == "awskms":
            return AWSKMSKey(spec.name, spec.region, spec.endpoint or None, runner)
        credentials = gcp_credentials_file or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
        if not credentials:
            raise ValueError(
                "a gcpkms key needs a service account key file: --gcp-credentials-file"
            )
        return GCPKMSKey(spec.name, spec.endpoint, ServiceAccount.load(credentials), runner)

    return Keyring(provider(primary), [provider(p) for p in previous])
