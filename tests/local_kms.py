"""A local AWS KMS for the tests: local-kms (github.com/nsmithuk/local-kms, built from the Go
module proxy by scripts/build-local-kms.sh and cached outside the repository) run with a
temporary data directory and reached on 127.0.0.1. A missing Go toolchain or a failed build
fails loudly (`LocalKMSError`); it never skips.

    with local_kms(tmp_path) as kms:
        arn = kms.create_key()
        client = kms.client()
        blob = client.encrypt(KeyId=arn, Plaintext=b"x", EncryptionContext={"a": "b"})

What the pinned local-kms does (checked by tests/secrets/test_local_kms.py):
- symmetric keys are AES-256-GCM; the encryption context is the GCM additional data, so a
  decrypt with a different (or missing) context fails with InvalidCiphertextException;
- the ciphertext blob names its key (1 byte length, the key ARN, a 4-byte backing-key version,
  a 12-byte nonce, the ciphertext, a 16-byte tag), so `decrypt` needs no KeyId;
- it takes any credentials and does not check request signatures;
- it has no bind-address setting: it listens on all interfaces (":PORT"). It is started on
  port 0 and the port it bound is read from its log, so there is no race for a free port.

Blocking (subprocess, urllib, boto3): call it from a test or fixture, not from the reactor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-local-kms.sh"

REGION = "eu-west-2"
ACCOUNT_ID = "111122223333"
# local-kms takes any credentials; boto3 still needs some to sign with.
ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"

_STARTED = re.compile(r"Local KMS started on \S*:(\d+)")


class LocalKMSError(RuntimeError):
    """local-kms could not be built, started or reached."""


def local_kms_binary(timeout: float = 900.0) -> Path:
    """The local-kms binary: runs scripts/build-local-kms.sh, which answers at once from its
    cache (${PULUMID_CACHE:-~/.cache/pulumid}/local-kms/VERSION/local-kms) and otherwise builds
    it with `go install` (tens of seconds, cold)."""
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LocalKMSError(f"{BUILD_SCRIPT.relative_to(REPO)} could not run: {e}") from e
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise LocalKMSError(
            f"{BUILD_SCRIPT.relative_to(REPO)} failed ({proc.returncode}); it needs Go and the "
            f"Go module proxy:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
        )
    binary = Path(lines[-1])
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise LocalKMSError(f"{BUILD_SCRIPT.relative_to(REPO)} printed {binary}: not executable")
    return binary


def _environment(workdir: Path, region: str, account_id: str) -> dict[str, str]:
    """A minimal environment: nothing of this machine's AWS_* or KMS_* setup, and a seed path
    that does not exist (the default, /init/seed.yaml, might)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
    env.update(
        PORT="0",
        KMS_DATA_PATH=str(workdir / "data"),
        KMS_SEED_PATH=str(workdir / "no-seed.yaml"),
        KMS_REGION=region,
        KMS_ACCOUNT_ID=account_id,
    )
    return env


class LocalKMS:
    """One local-kms process keeping its LevelDB database in WORKDIR/data and its log in
    WORKDIR/local-kms.log. `start()` launches it and waits until it answers; `stop()` ends it.
    `endpoint` (http://127.0.0.1:PORT) and `region` are what a KMS client needs."""

    def __init__(
        self,
        workdir: Path,
        *,
        binary: Path | None = None,
        region: str = REGION,
        account_id: str = ACCOUNT_ID,
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.region = region
        self.account_id = account_id
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "local-kms.log"

    @property
    def endpoint(self) -> str:
        if not self.port:
            raise LocalKMSError("local-kms is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LocalKMSError("local-kms is not running")
        return self._proc.pid

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 30.0) -> LocalKMS:
        if self._proc is not None:
            raise LocalKMSError("local-kms is already running")
        binary = self.binary or local_kms_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(binary)],
            cwd=self.workdir,
            env=_environment(self.workdir, self.region, self.account_id),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            problem = None
            if self._proc.poll() is not None:
                problem = f"exited with {self._proc.returncode} during startup"
            elif time.monotonic() > deadline:
                problem = f"was not ready within {timeout:.0f}s"
            if problem is not None:
                log = self.log_tail()
                self.stop()
                raise LocalKMSError(f"local-kms ({binary}) {problem}\nlog:\n{log}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        """Whether it has logged the port it bound and answers ListKeys there."""
        if not self.port:
            match = _STARTED.search(self.log_tail(1 << 20))
            if match is None:
                return False
            self.port = int(match.group(1))
        request = urllib.request.Request(
            self.endpoint + "/",
            data=b"{}",
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": "TrentService.ListKeys",
            },
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM its process group; SIGKILL it if it has not exited within `timeout`."""
        proc, self._proc = self._proc, None
        self.port = 0
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> Any:
        """A boto3 KMS client for this server (test credentials, no proxies, no retries)."""
        return boto3.client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(
                proxies={},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def create_key(self, description: str = "pulumid test key") -> str:
        """The ARN of a new symmetric (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT) key."""
        client = self.client()
        try:
            response = client.create_key(
                Description=description,
                KeySpec="SYMMETRIC_DEFAULT",
                KeyUsage="ENCRYPT_DECRYPT",
            )
        finally:
            client.close()
        return str(response["KeyMetadata"]["Arn"])

    def __enter__(self) -> LocalKMS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def local_kms(
    workdir: Path, *, region: str = REGION, account_id: str = ACCOUNT_ID
) -> Iterator[LocalKMS]:
    """A started LocalKMS keeping its files in WORKDIR (a test's tmp_path, say); stopped on
    exit. For a pytest fixture:

        @pytest.fixture
        def kms(tmp_path: Path) -> Iterator[LocalKMS]:
            with local_kms(tmp_path) as server:
                yield server
    """
    with LocalKMS(workdir, region=region, account_id=account_id) as server:
        yield server
