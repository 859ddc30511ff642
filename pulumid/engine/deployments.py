"""Deployment documents: parsing request bodies into the exact bytes we store.

Stored states are UntypedDeployment texts, gzip-compressed. We never re-serialise what the CLI
sent: the bytes are sliced out of the request so later byte-offset deltas stay valid.
These functions are blocking (big JSON, gzip) and run on the CPU pool.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import orjson

from pulumid.errors import BadRequest, TooLarge
from pulumid.storage.records import StateBlob

EMPTY_DEPLOYMENT = (
    b'{"version":3,"deployment":{"manifest":{"time":"0001-01-01T00:00:00Z",'
    b'"magic":"","version":""},"resources":null}}'
)

_decoder = json.JSONDecoder()


def gzip_blocking(data: bytes, level: int = 1) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def gunzip_blocking(data: bytes, limit: int) -> bytes:
    """Decompress gzip, refusing to grow past `limit` bytes (a gzip bomb stays small)."""
    decompressor = zlib.decompressobj(47)  # gzip or zlib header
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error:
        raise BadRequest("Bad Request: the request body is not valid gzip") from None
    if len(out) > limit or decompressor.unconsumed_tail:
        raise TooLarge(f"Payload Too Large: the request body exceeds {limit} bytes")
    if not decompressor.eof:
        raise BadRequest("Bad Request: the gzip request body is truncated")
    return out


# Deepest nesting accepted in a body. What we build around a body's values (a state around
# a journal entry's resource) and serialise again must stay within orjson's 254 levels.
MAX_DEPTH = 250
# Integers stored as SQL integers (sequence numbers) are signed 64-bit.
MAX_SQL_INT = 2**63 - 1


def load_json_blocking(body: bytes) -> Any:
    """The one parser of request bodies: the same one reads what we stored, later.

    It refuses what could be accepted now and fail later: NaN and infinities, numbers that
    overflow a double, lone surrogates, invalid UTF-8, a BOM, and nesting past MAX_DEPTH.
    """
    try:
        value = orjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Bad Request: the request body is not valid JSON") from None
    if isinstance(value, dict | list):
        _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Walk the containers only, without recursion and without a copy: a large state is
    mostly strings, and serialising it again to learn its depth would hold it twice."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(
                f"Bad Request: the request body is nested more than {MAX_DEPTH} levels deep"
            )
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))


def sequence_number(value: Any, name: str = "sequenceNumber") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SQL_INT:
        raise BadRequest(f"Bad Request: '{name}' must be an integer from 0 to {MAX_SQL_INT}")
    return value


def raw_members(text: str) -> dict[str, tuple[Any, str]]:
    """Top-level members of a JSON object: key -> (decoded value, exact source text)."""
    members: dict[str, tuple[Any, str]] = {}
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        raise BadRequest("Bad Request: expected a JSON object")
    i = _skip(text, i + 1)
    if i < len(text) and text[i] == "}":
        if _skip(text, i + 1) != len(text):
            raise BadRequest("Bad Request: unexpected text after the JSON object")
        return members
    while True:
        key, i = _decoder.raw_decode(text, i)
        if not isinstance(key, str):
            raise BadRequest("Bad Request: expected a JSON object")
        i = _skip(text, i)
        if i >= len(text) or text[i] != ":":
            raise BadRequest("Bad Request: malformed JSON object")
        start = _skip(text, i + 1)
        value, i = _decoder.raw_decode(text, start)
        members[key] = (value, text[start:i])
        i = _skip(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
            continue
        if i < len(text) and text[i] == "}":
            if _skip(text, i + 1) != len(text):
                raise BadRequest("Bad Request: unexpected text after the JSON object")
            return members
        raise BadRequest("Bad Request: malformed JSON object")


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _members(body: bytes) -> dict[str, tuple[Any, str]]:
    """Top-level members with their exact text, of a body the one parser accepts."""
    if not isinstance(load_json_blocking(body), dict):
        raise BadRequest("Bad Request: the request body must be a JSON object")
    try:
        return raw_members(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("Bad Request: the request body is not valid JSON") from None


def count_resources(deployment: Any) -> int:
    if not isinstance(deployment, dict):
        raise BadRequest("Bad Request: 'deployment' must be a JSON object")
    resources = deployment.get("resources")
    if resources is None:
        return 0
    if not isinstance(resources, list):
        raise BadRequest("Bad Request: 'deployment.resources' must be a list")
    return len(resources)


def _check_version(version: Any) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 4:
        raise BadRequest("Bad Request: deployment version must be an integer from 1 to 4")
    return version


def untyped_state_blocking(body: bytes) -> StateBlob:
    """An UntypedDeployment body (import, create-with-state): stored as sent."""
    members = _members(body)
    _check_version(members.get("version", (None, ""))[0])
    if "deployment" not in members:
        raise BadRequest("Bad Request: missing 'deployment'")
    count = count_resources(members["deployment"][0])
    return StateBlob(gzip_blocking(body.strip()), count)


def untyped_state_from_value_blocking(value: Any) -> StateBlob:
    """An UntypedDeployment already decoded (embedded in a larger JSON request)."""
    if not isinstance(value, dict):
        raise BadRequest("Bad Request: 'state' must be a JSON object")
    _check_version(value.get("version"))
    count = count_resources(value.get("deployment"))
    text = orjson.dumps(value)
    return StateBlob(gzip_blocking(text), count)


def checkpoint_state_blocking(body: bytes) -> StateBlob:
    """PATCH .../checkpoint: {"isInvalid", "version", "features"?, "deployment"}."""
    members = _members(body)
    version = _check_version(members.get("version", (None, ""))[0])
    if "deployment" not in members:
        raise BadRequest("Bad Request: missing 'deployment'")
    deployment, deployment_text = members["deployment"]
    count = count_resources(deployment)
    parts = [f'{{"version":{version}']
    if "features" in members and members["features"][0] is not None:
        parts.append(f',"features":{members["features"][1]}')
    parts.append(f',"deployment":{deployment_text}}}')
    return StateBlob(gzip_blocking("".join(parts).encode("utf-8")), count)


def parse_state_blocking(blob: StateBlob) -> dict[str, Any]:
    return orjson.loads(gunzip_blocking(blob.gzipped, 1 << 34))  # type: ignore[no-any-return]


def verbatim_text_blocking(body: bytes) -> tuple[bytes, int, int]:
    """PATCH .../checkpointverbatim: (exact untypedDeployment bytes, resources, sequence)."""
    members = _members(body)
    if "untypedDeployment" not in members:
        raise BadRequest("Bad Request: missing 'untypedDeployment'")
    value, text = members["untypedDeployment"]
    if not isinstance(value, dict):
        raise BadRequest("Bad Request: 'untypedDeployment' must be a JSON object")
    _check_version(value.get("version"))
    count = count_resources(value.get("deployment"))
    sequence = sequence_number(members.get("sequenceNumber", (0, ""))[0])
    return text.encode("utf-8"), count, sequence


DELTA_MISMATCH = "Bad Request: failed to apply checkpoint delta or validating checksum"


def apply_delta_blocking(
    baseline: bytes, last_sequence: int, body: bytes, *, check: bool = True
) -> tuple[int, bytes] | None:
    """Apply a delta checkpoint to the update's last saved text.

    Returns (sequence, new text), or None for a retry of a delta already applied. Offsets are
    byte offsets into the UTF-8 baseline; the result must hash to checkpointHash.
    """
    document = load_json_blocking(body)
    if not isinstance(document, dict):
        raise BadRequest("Bad Request: the request body must be a JSON object")
    sequence = sequence_number(document.get("sequenceNumber"))
    expected = document.get("checkpointHash")
    edits = document.get("deploymentDelta")
    if not isinstance(expected, str) or not isinstance(edits, list):
        raise BadRequest("Bad Request: 'checkpointHash' and 'deploymentDelta' are required")
    if sequence <= last_sequence and hashlib.sha256(baseline).hexdigest() == expected:
        return None
    spans: list[tuple[int, int, str]] = []
    for edit in edits:
        try:
            span = edit["Span"]
            start, end = span["start"]["offset"], span["end"]["offset"]
            text = edit["NewText"]
        except (KeyError, TypeError):
            raise BadRequest("Bad Request: malformed delta edit") from None
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(text, str)):
            raise BadRequest("Bad Request: malformed delta edit")
        spans.append((start, end, text))
    spans.sort(key=lambda s: s[0])
    out = bytearray()
    cursor = 0
    for start, end, text in spans:
        if not cursor <= start <= end <= len(baseline):
            raise BadRequest(DELTA_MISMATCH)
        out += baseline[cursor:start]
        out += text.encode("utf-8")
        cursor = end
    out += baseline[cursor:]
    result = bytes(out)
    if hashlib.sha256(result).hexdigest() != expected:
        raise BadRequest(DELTA_MISMATCH)
    if check:
        # The hash matched, but what it names must also be a state we can build at the end.
        state_from_text_blocking(result, compress=False)
    return sequence, result


def journal_entries_blocking(body: bytes) -> list[dict[str, Any]]:
    """PATCH .../journalentries: {"entries": [...]} (body already decompressed)."""
    document = load_json_blocking(body)
    entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequest("Bad Request: 'entries' must be a list of journal entries")
    return entries


def stored_journal_blocking(stored: list[bytes], limit: int) -> list[dict[str, Any]]:
    """Entries of the journal batches kept for an update, in arrival order."""
    entries: list[dict[str, Any]] = []
    for body in stored:
        if body[:2] == b"\x1f\x8b":
            body = gunzip_blocking(body, limit)
        entries.extend(journal_entries_blocking(body))
    return entries


def state_from_text_blocking(text: bytes, *, compress: bool = True) -> StateBlob:
    """A state whose text is already exact (verbatim/delta): check, count and compress."""
    document = load_json_blocking(text)
    if not isinstance(document, dict):
        raise BadRequest("Bad Request: the checkpoint is not a JSON object")
    _check_version(document.get("version"))
    count = count_resources(document.get("deployment"))
    return StateBlob(gzip_blocking(text) if compress else b"", count)


# Resources serialised and compressed together when a state is streamed out.
STREAM_CHUNK = 256


def state_from_document_blocking(document: dict[str, Any]) -> StateBlob:
    """Serialise and compress a state we built, a chunk of resources at a time.

    The whole text is never held: a large stack's state is as big as its parsed resources,
    and holding both at once is what an update's peak memory would be made of. The
    resources come last in `deployment`, which JSON readers do not care about.
    """
    deployment = document.get("deployment")
    resources = deployment.get("resources") if isinstance(deployment, dict) else None
    if not isinstance(deployment, dict) or not isinstance(resources, list) or not resources:
        text = orjson.dumps(document)
        return StateBlob(gzip_blocking(text), count_resources(deployment))
    rest = {key: value for key, value in deployment.items() if key != "resources"}
    head = orjson.dumps({**document, "deployment": rest})
    # `deployment` is the document's last key and `rest` has at least the manifest.
    if list(document)[-1] != "deployment" or not rest or head[-2:] != b"}}":
        raise ValueError("a state to stream must end with a non-empty deployment")
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(head[:-2] + b',"resources":[')]
    for start in range(0, len(resources), STREAM_CHUNK):
        chunk = resources[start : start + STREAM_CHUNK]
        text = b",".join(orjson.dumps(res) for res in chunk)
        parts.append(compressor.compress(text if start == 0 else b"," + text))
    parts.append(compressor.compress(b"]}}"))
    parts.append(compressor.flush())
    return StateBlob(b"".join(parts), len(resources))
