"""OpenTelemetry traces over OTLP/HTTP, off unless `--otlp-endpoint` is given.

Spans: one per HTTP request (SERVER, named "METHOD route template", continuing the W3C
trace context of an incoming `traceparent`), and one per database call (a child of the
request that made it, run on the database thread). The SDK's batch processor exports from
its own thread, so the reactor never waits on the collector.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from pulumid import __version__


class Tracing:
    def __init__(self, exporter: SpanExporter, service_name: str = "pulumid") -> None:
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("pulumid", __version__)

    @classmethod
    def otlp(cls, endpoint: str, service_name: str = "pulumid") -> Tracing:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter(endpoint=endpoint, timeout=10), service_name)

    @contextmanager
    def request(self, method: str, route: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The span of one HTTP request, current for the code (and awaits) inside."""
        parent = propagate.extract(carrier=dict(headers))
        span = self.tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        except Exception as e:
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    @contextmanager
    def operation(self, name: str) -> Iterator[None]:
        """An engine operation's span, under the current (request) span."""
        with self.tracer.start_as_current_span(name, kind=SpanKind.INTERNAL):
            yield

    def current(self) -> otel_context.Context:
        return otel_context.get_current()

    @contextmanager
    def database(self, name: str, parent: otel_context.Context) -> Iterator[None]:
        """A database call's span, on the thread that runs it, under PARENT's span."""
        with self.tracer.start_as_current_span(
            f"db {name}", context=parent, kind=SpanKind.CLIENT, attributes={"db.operation": name}
        ):
            yield

    def shutdown(self) -> None:
        self.provider.shutdown()
