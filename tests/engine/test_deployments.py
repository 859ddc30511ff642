"""Deployment bodies: exact source text survives, gzip is bounded."""

from __future__ import annotations

import gzip
import json
import os

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pulumid.engine.deployments import (
    EMPTY_DEPLOYMENT,
    MAX_DEPTH,
    STREAM_CHUNK,
    checkpoint_state_blocking,
    gunzip_blocking,
    gzip_blocking,
    load_json_blocking,
    parse_state_blocking,
    raw_members,
    state_from_document_blocking,
    untyped_state_blocking,
    untyped_state_from_value_blocking,
    verbatim_text_blocking,
)
from pulumid.errors import BadRequest, TooLarge

DEPLOYMENT = (
    '{"manifest":{"time":"2024-05-01T10:00:00Z","magic":"","version":""},'
    '"resources":[{"urn":"urn:pulumi:dev::demo::a:b:C::\\u003cx\\u0026y\\u003e",'
    '"outputs":{"f":1.50,"g":1e3,"h":-0.0,"i":100000000000000000000,"j":"\\u00e9\\/"}}]}'
)


def unzip(data: bytes) -> bytes:
    return gzip.decompress(data)


# -- raw_members --------------------------------------------------------------------------


def test_raw_members_keep_exact_source_text() -> None:
    text = f' {{ "version" : 3 ,\n "deployment":{DEPLOYMENT}\t, "x": [1.0, 2E+2] }} '
    members = raw_members(text)
    assert list(members) == ["version", "deployment", "x"]
    assert members["version"] == (3, "3")
    value, source = members["deployment"]
    assert source == DEPLOYMENT
    assert value == json.loads(DEPLOYMENT)
    assert "\\u003c" in source and "1.50" in source and "1e3" in source
    assert members["x"] == ([1.0, 200.0], "[1.0, 2E+2]")


def test_raw_members_of_an_empty_object() -> None:
    assert raw_members("{}") == {}
    assert raw_members(" { \n } ") == {}


@pytest.mark.parametrize(
    "text", ["", "[]", '"s"', '{"a" 1}', '{"a":1', '{"a":1,}', "{1:2}", '{"a":1 "b":2}']
)
def test_raw_members_rejects_non_objects(text: str) -> None:
    with pytest.raises((BadRequest, ValueError)):
        raw_members(text)


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=5,
    ),
    st.booleans(),
)
def test_raw_members_slices_agree_with_json(value: dict[str, object], ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=1)
    members = raw_members(text)
    assert {k: v for k, (v, _src) in members.items()} == json.loads(text)
    for key, (decoded, source) in members.items():
        assert source in text
        assert json.loads(source) == decoded
        assert json.dumps(key, ensure_ascii=ascii_only) in text


# -- checkpoint ---------------------------------------------------------------------------


def test_checkpoint_builds_an_untyped_deployment_from_the_exact_bytes() -> None:
    body = f'{{"isInvalid":false,"version":3,"deployment":{DEPLOYMENT}}}'.encode()
    state = checkpoint_state_blocking(body)
    assert unzip(state.gzipped) == f'{{"version":3,"deployment":{DEPLOYMENT}}}'.encode()
    assert state.resource_count == 1


def test_checkpoint_keeps_features() -> None:
    body = (
        '{"isInvalid":false,"version":4,"features":["refreshBeforeUpdate", "views"],'
        f'"deployment":{DEPLOYMENT}}}'
    ).encode()
    state = checkpoint_state_blocking(body)
    assert (
        unzip(state.gzipped)
        == (
            f'{{"version":4,"features":["refreshBeforeUpdate", "views"],"deployment":{DEPLOYMENT}}}'
        ).encode()
    )


def test_checkpoint_drops_null_features() -> None:
    body = b'{"version":3,"features":null,"deployment":{"resources":null}}'
    state = checkpoint_state_blocking(body)
    assert unzip(state.gzipped) == b'{"version":3,"deployment":{"resources":null}}'
    assert state.resource_count == 0


def test_checkpoint_keeps_non_ascii_text() -> None:
    body = '{"version":3,"deployment":{"resources":[{"urn":"ü€😀"}]}}'.encode()
    state = checkpoint_state_blocking(body)
    assert unzip(state.gzipped) == body


@pytest.mark.parametrize(
    "body",
    [
        b'{"version":0,"deployment":{}}',
        b'{"version":5,"deployment":{}}',
        b'{"version":true,"deployment":{}}',
        b'{"version":3}',
        b'{"version":3,"deployment":[]}',
        b'{"version":3,"deployment":{"resources":"x"}}',
        b"{",
        b"\xc3\x28",
    ],
)
def test_checkpoint_validation(body: bytes) -> None:
    with pytest.raises(BadRequest):
        checkpoint_state_blocking(body)


# -- verbatim -----------------------------------------------------------------------------


def test_verbatim_keeps_the_bytes_exactly() -> None:
    untyped = f'{{"version":3,"deployment":{DEPLOYMENT}}}'
    body = f'{{"version":3,"untypedDeployment":{untyped},"sequenceNumber":7}}'.encode()
    text, count, sequence = verbatim_text_blocking(body)
    assert text == untyped.encode()
    assert sequence == 7
    assert count == 1


def test_verbatim_keeps_non_ascii_bytes() -> None:
    untyped = '{"version":3,"deployment":{"resources":[{"urn":"naïve ☃"}]}}'
    body = f'{{"version":3,"untypedDeployment":{untyped},"sequenceNumber":1}}'.encode()
    text, _count, _sequence = verbatim_text_blocking(body)
    assert text == untyped.encode()


@pytest.mark.parametrize(
    "body",
    [
        b'{"version":3,"sequenceNumber":1}',
        b'{"version":3,"untypedDeployment":"{}","sequenceNumber":1}',
        b'{"untypedDeployment":{"version":9,"deployment":{}},"sequenceNumber":1}',
        b'{"untypedDeployment":{"version":3,"deployment":{}},"sequenceNumber":"1"}',
    ],
)
def test_verbatim_validation(body: bytes) -> None:
    with pytest.raises(BadRequest):
        verbatim_text_blocking(body)


# -- untyped (import, create with state) --------------------------------------------------


def test_untyped_state_is_stored_as_sent() -> None:
    body = f'{{"version":3,"deployment":{DEPLOYMENT}}}'.encode()
    state = untyped_state_blocking(b"  " + body + b"\n")
    assert unzip(state.gzipped) == body
    assert parse_state_blocking(state) == json.loads(body)


def test_untyped_state_rejects_trailing_garbage() -> None:
    with pytest.raises(BadRequest):
        untyped_state_blocking(b'{"version":3,"deployment":{}} trailing')


def test_untyped_state_from_value() -> None:
    value = {"version": 3, "deployment": {"manifest": {}, "resources": [{"urn": "u"}]}}
    state = untyped_state_from_value_blocking(value)
    assert json.loads(unzip(state.gzipped)) == value
    assert state.resource_count == 1
    with pytest.raises(BadRequest):
        untyped_state_from_value_blocking([])
    with pytest.raises(BadRequest):
        untyped_state_from_value_blocking({"version": 3})


def test_empty_deployment_is_valid() -> None:
    document = json.loads(EMPTY_DEPLOYMENT)
    assert document["version"] == 3
    assert isinstance(document["deployment"], dict)


# -- gzip and JSON ------------------------------------------------------------------------


def test_gzip_round_trip() -> None:
    data = os.urandom(1000) + b"x" * 100_000
    assert gunzip_blocking(gzip_blocking(data), len(data)) == data
    assert gunzip_blocking(gzip.compress(data), len(data)) == data
    assert gunzip_blocking(gzip_blocking(b""), 0) == b""


def test_gunzip_limit() -> None:
    bomb = gzip_blocking(b"\0" * (10 * 1024 * 1024), level=9)
    assert len(bomb) < 64 * 1024
    with pytest.raises(TooLarge) as raised:
        gunzip_blocking(bomb, 1024 * 1024)
    assert raised.value.status == 413
    with pytest.raises(TooLarge):
        gunzip_blocking(gzip_blocking(b"x" * 101), 100)
    assert gunzip_blocking(gzip_blocking(b"x" * 100), 100) == b"x" * 100


@pytest.mark.parametrize("data", [b"not gzip at all", b"\x1f\x8b\x07\x00garbage", b"\x00" * 20])
def test_bad_gzip(data: bytes) -> None:
    with pytest.raises(BadRequest) as raised:
        gunzip_blocking(data, 1 << 20)
    assert raised.value.status == 400


@pytest.mark.parametrize("cut", [-8, -4, 15, 4], ids=["no-trailer", "no-size", "mid", "header"])
def test_truncated_gzip_is_a_bad_request(cut: int) -> None:
    data = gzip_blocking(b'{"version":3,"deployment":{"resources":[]}}' * 10)
    with pytest.raises(BadRequest):
        gunzip_blocking(data[:cut], 1 << 20)


def test_load_json() -> None:
    assert load_json_blocking(b'{"a":[1]}') == {"a": [1]}
    for bad in (b"{", b"\xff", b"nope"):
        with pytest.raises(BadRequest):
            load_json_blocking(bad)


# -- states we build, streamed out ----------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, STREAM_CHUNK, STREAM_CHUNK + 1, 3 * STREAM_CHUNK - 7])
def test_a_built_state_streams_to_the_same_document(count: int) -> None:
    resources = [
        {"urn": f"urn:pulumi:dev::demo::a:b:C::r{i}", "type": "a:b:C", "outputs": {"n": i}}
        for i in range(count)
    ]
    deployment: dict[str, object] = {
        "manifest": {"time": "2024-05-01T10:00:00Z", "magic": "", "version": "3.0.0"},
        "secrets_providers": {"type": "service", "state": {}},
        "resources": resources,
        "pending_operations": [{"resource": {"urn": "u", "type": "t"}, "type": "creating"}],
        "metadata": {},
    }
    document = {"version": 4, "features": ["byteString"], "deployment": deployment}
    state = state_from_document_blocking(document)
    assert state.resource_count == count
    assert json.loads(unzip(state.gzipped)) == document


@pytest.mark.parametrize("container", ["[", '{"a":'])
def test_nesting_is_refused_past_max_depth_and_what_is_kept_serialises(container: str) -> None:
    close = "]" if container == "[" else "}"
    at_limit = (container * MAX_DEPTH + "1" + close * MAX_DEPTH).encode()
    value = load_json_blocking(at_limit)
    # What we build around a kept body (a state around a resource) still serialises.
    assert orjson.loads(orjson.dumps([[[[value]]]])) == [[[[value]]]]
    over = (container * (MAX_DEPTH + 1) + "1" + close * (MAX_DEPTH + 1)).encode()
    with pytest.raises(BadRequest, match="nested more than"):
        load_json_blocking(over)
