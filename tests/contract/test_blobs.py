"""The contract every `BlobStore` keeps, run against each implementation, plus what only S3
has to get right (URL parsing, error mapping).

Adding an implementation (inline in the metadata database, issue 14) is one entry in
IMPLEMENTATIONS: the name of a fixture that yields a fresh, empty store. The stores run their
work inline, so every Deferred has fired when the call returns. S3 runs against a real MinIO
on loopback; a missing MinIO binary fails the tests, it never skips them.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from benchmarks.common import (
    free_port,
)
from pulumid.errors import Unavailable
from pulumid.storage.blobs import (
    MAX_KEY_LENGTH,
    MAX_SEGMENT_LENGTH,
    BlobStore,
    S3Blobs,
    S3Location,
    parse_s3_url,
    validate_key,
    validate_prefix,
)
from pulumid.threads import InlineRunner, Runner
from tests.contract.test_store import fails, ok
from tests.minio import s3_url

pytestmark = pytest.mark.live


@pytest.fixture
def s3_blobs(minio_endpoint: str) -> Iterator[BlobStore]:
    # A fresh prefix per test: the bucket is shared by the session.
    opened = S3Blobs.open(s3_url(minio_endpoint, f"t-{uuid.uuid4().hex}"), InlineRunner())
    try:
        yield opened
    finally:
        opened.close()


# name -> fixture yielding a fresh, empty store. One line per implementation.
IMPLEMENTATIONS: dict[str, str] = {
    "s3": "s3_blobs",
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def blobs(request: pytest.FixtureRequest) -> BlobStore:
    store: BlobStore = request.getfixturevalue(IMPLEMENTATIONS[request.param])
    return store


# --------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("size", [0, 1, 5 * 1024 * 1024], ids=["empty", "1B", "5MB"])
def test_put_get_round_trip(blobs: BlobStore, size: int) -> None:
    data = os.urandom(size)
    assert ok(blobs.put("checkpoints/1/state", data)) is None
    assert ok(blobs.get("checkpoints/1/state")) == data


def test_put_overwrites(blobs: BlobStore) -> None:
    ok(blobs.put("a", b"first"))
    ok(blobs.put("a", b"second, longer"))
    assert ok(blobs.get("a")) == b"second, longer"
    assert ok(blobs.list_keys("")) == ["a"]


def test_get_missing_is_none(blobs: BlobStore) -> None:
    assert ok(blobs.get("never/written")) is None
    ok(blobs.put("never/written-but-this", b"x"))
    assert ok(blobs.get("never/written")) is None  # no prefix matching


def test_delete_present_and_missing(blobs: BlobStore) -> None:
    ok(blobs.put("keep", b"k"))
    ok(blobs.put("gone/1", b"1"))
    ok(blobs.put("gone/2", b"2"))
    assert ok(blobs.delete(["gone/1", "missing", "gone/2", "also/missing"])) is None
    assert ok(blobs.get("gone/1")) is None
    assert ok(blobs.get("gone/2")) is None
    assert ok(blobs.get("keep")) == b"k"
    ok(blobs.delete([]))
    ok(blobs.delete(["gone/1"]))  # twice is fine
    assert ok(blobs.list_keys("")) == ["keep"]


def test_list_keys_by_prefix(blobs: BlobStore) -> None:
    for key in ["s/1/a", "s/1/b", "s/10/a", "s/2/a", "t/1/a"]:
        ok(blobs.put(key, b""))
    assert ok(blobs.list_keys("s/1/")) == ["s/1/a", "s/1/b"]
    assert ok(blobs.list_keys("s/1")) == ["s/1/a", "s/1/b", "s/10/a"]
    assert ok(blobs.list_keys("s/")) == ["s/1/a", "s/1/b", "s/10/a", "s/2/a"]
    assert ok(blobs.list_keys("")) == ["s/1/a", "s/1/b", "s/10/a", "s/2/a", "t/1/a"]
    assert ok(blobs.list_keys("u/")) == []


def test_list_and_delete_past_one_page(blobs: BlobStore) -> None:
    # More than one page of ListObjectsV2 and one DeleteObjects batch (1,000 each).
    keys = sorted(f"many/{i:05d}" for i in range(1100))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: ok(blobs.put(k, k.encode())), keys))
    ok(blobs.put("other", b""))
    assert ok(blobs.list_keys("many/")) == keys
    ok(blobs.delete([*keys, "many/missing"]))
    assert ok(blobs.list_keys("")) == ["other"]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/leading",
        "trailing/",
        "double//slash",
        "..",
        "a/../b",
        "./a",
        "space here",
        "uni\u00e9",
        "back\\slash",
        "x" * (MAX_SEGMENT_LENGTH + 1),
        "a/" + "x" * (MAX_SEGMENT_LENGTH + 1) + "/b",
        "/".join(["x" * 200] * 3),  # over MAX_KEY_LENGTH
    ],
)
def test_bad_keys_are_value_errors(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        blobs.put(key, b"")
    with pytest.raises(ValueError):
        blobs.get(key)
    with pytest.raises(ValueError):
        blobs.delete(["fine", key])


def test_good_keys(blobs: BlobStore) -> None:
    keys = ["a", "A-Z_0.9", "stacks/acme/web/dev/v1.json.gz", "a..b", ".hidden"]
    longest = "x" * MAX_SEGMENT_LENGTH + "/" + "y" * (MAX_SEGMENT_LENGTH - 1) + "/z"
    assert len(longest) == MAX_KEY_LENGTH
    keys.append(longest)
    for key in keys:
        assert validate_key(key) == key
        ok(blobs.put(key, key.encode()))
        assert ok(blobs.get(key)) == key.encode()
    assert ok(blobs.list_keys("")) == sorted(keys)


@pytest.mark.parametrize(
    "prefix", ["/x", "a//", "../", "a/./", "sp ace", "x" * 256, "x" * 256 + "/"]
)
def test_bad_prefixes_are_value_errors(blobs: BlobStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        blobs.list_keys(prefix)


def test_good_prefixes() -> None:
    for prefix in ["", "a", "a/", "a/b", "a/b/", "a/."]:
        assert validate_prefix(prefix) == prefix


# --------------------------------------------------------------------------------------------
# S3 only


class CountingRunner(Runner):
    """Runs inline, counting the callables: all blocking work must go through the runner."""

    def __init__(self) -> None:
        self.calls = 0
        self._inline = InlineRunner()

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._inline.run(f, *args, **kwargs)


def test_s3_does_its_io_through_the_runner(minio_endpoint: str) -> None:
    runner = CountingRunner()
    store = S3Blobs.open(s3_url(minio_endpoint, f"t-{uuid.uuid4().hex}"), runner)
    try:
        ok(store.put("k", b"v"))
        ok(store.get("k"))
        ok(store.list_keys(""))
        ok(store.delete(["k"]))
        assert runner.calls == 4
    finally:
        store.close()


def test_s3_prefix_isolates_stores(minio_endpoint: str) -> None:
    base = f"t-{uuid.uuid4().hex}"
    outer = S3Blobs.open(s3_url(minio_endpoint, base), InlineRunner())
    inner = S3Blobs.open(s3_url(minio_endpoint, f"{base}/inner"), InlineRunner())
    try:
        ok(inner.put("k", b"inner"))
        ok(outer.put("k", b"outer"))
        assert ok(inner.get("k")) == b"inner"
        assert ok(inner.list_keys("")) == ["k"]
        assert ok(outer.list_keys("")) == ["inner/k", "k"]
    finally:
        inner.close()
        outer.close()


def test_s3_unreachable_endpoint_is_unavailable(aws_env: None) -> None:
    port = free_port()  # a closed loopback port: connections are refused at once
    store = S3Blobs.open(
        s3_url(f"http://127.0.0.1:{port}", "p"),
        InlineRunner(),
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )
    try:
        deferreds: list[Deferred[Any]] = [
            store.put("k", b"v"),
            store.get("k"),
            store.delete(["k"]),
            store.list_keys(""),
        ]
        for d in deferreds:
            error = fails(d, Unavailable)
            assert error.status == 503
            assert "object storage failed" in error.message
            assert "127.0.0.1" not in error.message  # no endpoint details to clients
    finally:
        store.close()


def test_s3_missing_bucket_is_unavailable_not_none(minio_endpoint: str) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}?endpoint={minio_endpoint}&path_style=1"
    store = S3Blobs.open(url + "&region=us-east-1", InlineRunner())
    try:
        assert "NoSuchBucket" in fails(store.get("k"), Unavailable).message
        fails(store.put("k", b""), Unavailable)
        fails(store.list_keys(""), Unavailable)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", S3Location("bucket", "", None, None, False)),
        ("s3://bucket/", S3Location("bucket", "", None, None, False)),
        ("s3://my.bucket-1/a/b/", S3Location("my.bucket-1", "a/b/", None, None, False)),
        (
            "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&path_style=true",
            S3Location("bucket", "prefix/", "http://127.0.0.1:9000", "us-east-1", True),
        ),
        (
            "s3://b12?path_style=FALSE&endpoint=https://s3.example.com",
            S3Location("b12", "", "https://s3.example.com", None, False),
        ),
    ],
)
def test_parse_s3_url(url: str, expected: S3Location) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://bucket/x", "must start with s3://"),
        ("bucket/x", "must start with s3://"),
        ("s3:///prefix", "not a valid S3 bucket name"),
        ("s3://Bucket", "not a valid S3 bucket name"),
        ("s3://ab", "not a valid S3 bucket name"),
        ("s3://key:secret@bucket", "no user, password or port"),
        ("s3://bucket:9000", "no user, password or port"),
        ("s3://bucket/a/../b", "bad prefix"),
        ("s3://bucket/a b", "bad prefix"),
        ("s3://bucket#frag", "fragment"),
        ("s3://bucket?endpont=http://x", "unknown option 'endpont'"),
        ("s3://bucket?region=a&region=b", "given twice"),
        ("s3://bucket?region=", "is empty"),
        ("s3://bucket?endpoint=127.0.0.1:9000", "endpoint must be an http"),
        ("s3://bucket?endpoint=ftp://host", "endpoint must be an http"),
        ("s3://bucket?path_style=maybe", "path_style must be true or false"),
    ],
)
def test_parse_s3_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_s3_url(url)


def test_s3_open_rejects_bad_url() -> None:
    with pytest.raises(ValueError, match="must start with s3://"):
        S3Blobs.open("file:///tmp/x", InlineRunner())
