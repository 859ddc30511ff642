"""The blob seam (issue 14): opaque bytes by key, beside the metadata database.

Transactions and references live in the metadata database; a blob store only promises that
`put` is durable when its Deferred fires, `get` of a key never written is None, and `delete`
ignores missing keys. Key errors are raised at once, not through the Deferred.

Keys are chosen by pulumid, never by clients, so a bad key is a programming error
(ValueError), not a BadRequest. A key is 1 to 512 characters of `A-Z a-z 0-9 / . _ -`,
made of `/`-separated segments of at most 255 characters that are neither empty nor `.` or
`..` (so no leading, trailing or doubled `/`): the same key then means the same thing on S3,
in a database and on a file system (MinIO stores segments as file names: NAME_MAX is 255).

Backend failures surface as `Unavailable` (503), never as backend exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet.defer import Deferred

from pulumid.errors import Unavailable
from pulumid.threads import Runner

T = TypeVar("T")

MAX_KEY_LENGTH = 512
MAX_SEGMENT_LENGTH = 255
DELETE_BATCH = 1000  # the most one S3 DeleteObjects request accepts

_KEY_CHARS = re.compile(r"[A-Za-z0-9/._-]*")


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> Deferred[None]: ...
    def get(self, key: str) -> Deferred[bytes | None]: ...
    def delete(self, keys: list[str]) -> Deferred[None]: ...
    def list_keys(self, prefix: str) -> Deferred[list[str]]: ...  # sorted
    def close(self) -> None: ...


def _check_segments(text: str, what: str, segments: list[str]) -> None:
    if len(text) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_KEY_LENGTH} characters: {text[:40]!r}...")
    if not _KEY_CHARS.fullmatch(text):
        raise ValueError(f"{what} {text!r} has a character outside [A-Za-z0-9/._-]")
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"{what} {text!r} has an empty, '.' or '..' segment")
    if any(len(s) > MAX_SEGMENT_LENGTH for s in text.split("/")):
        raise ValueError(f"{what} {text!r} has a segment over {MAX_SEGMENT_LENGTH} characters")


def validate_key(key: str) -> str:
    """KEY if it is a valid blob key; ValueError otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a blob key must be a non-empty string, not {key!r}")
    _check_segments(key, "blob key", key.split("/"))
    return key


def validate_prefix(prefix: str) -> str:
    """PREFIX if some valid key can start with it ('' and a trailing '/' are fine)."""
    if not isinstance(prefix, str):
        raise ValueError(f"a blob prefix must be a string, not {prefix!r}")
    # The last segment may be partial ("checkpoints/12" matches "checkpoints/123").
    segments = prefix.split("/")[:-1]
    _check_segments(prefix, "blob prefix", segments)
    return prefix


# --------------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # '' or ends with '/'
    endpoint: str | None
    region: str | None
    path_style: bool


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket[/prefix][?endpoint=URL&region=NAME&path_style=true|false]`."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"blob storage URL must start with s3://, got {url!r}")
    if parts.fragment:
        raise ValueError(f"blob storage URL {url!r} must not have a #fragment")
    if "@" in parts.netloc or ":" in parts.netloc:
        # Credentials come from the AWS chain, never from a URL that ends up in logs.
        raise ValueError(f"blob storage URL {url!r}: s3://BUCKET takes no user, password or port")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"blob storage URL {url!r}: {bucket!r} is not a valid S3 bucket name")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except ValueError as e:
            raise ValueError(f"blob storage URL {url!r}: bad prefix: {e}") from None
        prefix += "/"

    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in ("endpoint", "region", "path_style"):
            raise ValueError(
                f"blob storage URL {url!r}: unknown option {name!r} "
                "(known: endpoint, region, path_style)"
            )
        if name in options:
            raise ValueError(f"blob storage URL {url!r}: option {name!r} given twice")
        if not value:
            raise ValueError(f"blob storage URL {url!r}: option {name!r} is empty")
        options[name] = value

    endpoint = options.get("endpoint")
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise ValueError(
                f"blob storage URL {url!r}: endpoint must be an http:// or https:// URL"
            )
    path_style = options.get("path_style", "false").lower()
    if path_style not in _BOOLS:
        raise ValueError(f"blob storage URL {url!r}: path_style must be true or false")
    return S3Location(bucket, prefix, endpoint, options.get("region"), _BOOLS[path_style])


def s3_client(
    location: S3Location,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 3,
    max_connections: int = 10,
) -> Any:
    """A boto3 S3 client for LOCATION (credentials from boto3's default chain); no I/O."""
    config = Config(
        region_name=location.region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_connections,
        s3={"addressing_style": "path" if location.path_style else "auto"},
    )
    # A session per client: sessions (unlike clients) are not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=location.endpoint, config=config)


def _no_such_key(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


class S3Blobs(BlobStore):
    """Blobs as objects under one bucket and prefix of any S3 API (AWS, MinIO, R2...).

    The boto3 client is thread-safe, so one is shared by every thread of the runner.
    """

    def __init__(self, client: Any, location: S3Location, runner: Runner) -> None:
        self._client = client
        self._bucket = location.bucket
        self._prefix = location.prefix
        self._runner = runner

    @classmethod
    def open(
        cls,
        url: str,
        runner: Runner,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        max_connections: int = 10,
    ) -> S3Blobs:
        """A store for URL (see parse_s3_url); credentials come from boto3's default chain.
        Opening does no network I/O: a wrong endpoint shows on the first call."""
        location = parse_s3_url(url)
        client = s3_client(
            location,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_connections=max_connections,
        )
        return cls(client, location, runner)

    def _run(self, what: str, f: Callable[[], T]) -> Deferred[T]:
        def guarded() -> T:
            try:
                return f()
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "unknown")
                raise Unavailable(f"object storage failed to {what} ({code})") from e
            except BotoCoreError as e:
                raise Unavailable(f"object storage failed to {what} ({type(e).__name__})") from e

        return self._runner.run(guarded)

    def put(self, key: str, data: bytes) -> Deferred[None]:
        name = self._prefix + validate_key(key)

        def put() -> None:
            # S3 acknowledges a PUT only once the object is durably stored.
            self._client.put_object(Bucket=self._bucket, Key=name, Body=data)

        return self._run("store a blob", put)

    def get(self, key: str) -> Deferred[bytes | None]:
        name = self._prefix + validate_key(key)

        def get() -> bytes | None:
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=name)
            except ClientError as e:
                if _no_such_key(e):
                    return None
                raise
            body = response["Body"]
            try:
                data: bytes = body.read()  # inside the guard: a broken stream is Unavailable
            finally:
                body.close()
            return data

        return self._run("read a blob", get)

    def delete(self, keys: list[str]) -> Deferred[None]:
        names = [self._prefix + validate_key(k) for k in keys]

        def delete() -> None:
            for start in range(0, len(names), DELETE_BATCH):
                batch = names[start : start + DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True},
                )
                # DeleteObjects answers 200 even when some keys failed.
                errors = response.get("Errors") or []
                if errors:
                    code = errors[0].get("Code", "unknown")
                    raise Unavailable(
                        f"object storage failed to delete {len(errors)} blob(s) ({code})"
                    )

        return self._run("delete blobs", delete)

    def list_keys(self, prefix: str) -> Deferred[list[str]]:
        full = self._prefix + validate_prefix(prefix)
        strip = len(self._prefix)

        def list_keys() -> list[str]:
            keys: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=full):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", ()))
            keys.sort()  # S3 sorts by UTF-8 bytes already; keys are ASCII, so this is a no-op
            return keys

        return self._run("list blobs", list_keys)

    def close(self) -> None:
        self._client.close()
