"""Traces: what pulumid sends over OTLP/HTTP, decoded by a receiver the test runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.api.test_api import ORG, serve

pytestmark = pytest.mark.live

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver(Resource):
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []
        self.content_types: list[str] = []

    def render_POST(self, request: Any) -> bytes:
        self.content_types.append(request.getHeader("content-type") or "")
        message = ExportTraceServiceRequest()
        message.ParseFromString(request.content.read())
        for resource_spans in message.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            self.resources.append(attributes)
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans if s.name == name]


@pytest_twisted.ensureDeferred
async def test_spans_for_requests_and_database_calls(tmp_path: Path) -> None:
    receiver = Receiver()
    port: IListeningPort = cast(Any, reactor).listenTCP(0, Site(receiver), interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    endpoint = f"http://127.0.0.1:{address.port}/v1/traces"
    try:
        async with serve(tmp_path, otlp_endpoint=endpoint) as server:
            traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
            await server.ok("GET", "/api/user", headers={"traceparent": traceparent})
            await server.ok("POST", f"/api/stacks/{ORG}/web", {"stackName": "dev"})
            await server.ok("POST", f"/api/stacks/{ORG}/web/dev/encrypt", {"plaintext": "eA=="})
            # The exporter posts from its own thread to the receiver on this reactor.
            await deferToThread(server.backend.tracing.provider.force_flush)
    finally:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping

    assert receiver.content_types and receiver.content_types[0] == "application/x-protobuf"
    assert receiver.resources[0]["service.name"] == "pulumid"
    (user,) = receiver.named("GET /api/user")
    # The incoming W3C trace context is continued.
    assert user.trace_id.hex() == TRACE_ID
    assert user.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in user.attributes}
    assert attributes["http.route"].string_value == "/api/user"
    assert attributes["http.response.status_code"].int_value == 200

    (create,) = receiver.named("POST /api/stacks/{org}/{project}")
    assert create.parent_span_id == b""  # no traceparent: a new trace
    children = [s for s in receiver.spans if s.parent_span_id == create.span_id]
    assert any(s.name == "db create_stack" for s in children), [s.name for s in children]
    assert all(s.trace_id == create.trace_id for s in children)
    # An engine operation is a span of its own between the request and its database calls.
    (encrypt,) = receiver.named("POST /api/stacks/{org}/{project}/{stack}/encrypt")
    (engine,) = receiver.named("engine.encrypt")
    assert engine.parent_span_id == encrypt.span_id
    below = [s for s in receiver.spans if s.parent_span_id == engine.span_id]
    assert below and all(s.name.startswith("db ") for s in below), [s.name for s in below]
    # The store's call ran within the request (its audit row may be written after it).
    (db,) = [s for s in children if s.name == "db create_stack"]
    assert create.start_time_unix_nano <= db.start_time_unix_nano
    assert db.end_time_unix_nano <= create.end_time_unix_nano
