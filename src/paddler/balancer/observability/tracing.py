"""OpenTelemetry traces: one trace per proxied request.

Each request gets a server span (continuing the client's W3C ``traceparent`` if it sent one),
a child span for the time it waited in the buffer, and a client span per upstream attempt with
the agent's name and llama.cpp's address as attributes. The first chunk of the answer is an
event (``first_token``) on the server span. The upstream span's context goes to llama.cpp as
``traceparent``, so that a traced llama.cpp (or a proxy in front of it) joins the same trace.
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.observability.observers import Observer, RequestRecord


@dataclass
class _Spans:
    server: Span
    buffer: Span | None = None
    upstream: Span | None = None


class TracingObserver(Observer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        # Keyed by the record itself, so that spans cannot outlive their request.
        self._spans: weakref.WeakKeyDictionary[RequestRecord, _Spans] = weakref.WeakKeyDictionary()

    def request_started(self, record: RequestRecord) -> None:
        parent = extract(dict(record.client_headers))
        span = self._tracer.start_span(
            f"{record.method} {record.route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": record.method,
                "url.path": record.path,
                "http.route": record.route,
                "paddler.request_id": record.id,
                "paddler.needs_slot": record.needs_slot,
            },
        )
        if record.key_id is not None:
            span.set_attribute("paddler.api_key.id", record.key_id)
        self._spans[record] = _Spans(server=span)

    def buffer_wait_started(self, record: RequestRecord) -> None:
        spans = self._spans.get(record)
        if spans is not None:
            spans.buffer = self._tracer.start_span(
                "buffer wait", context=trace.set_span_in_context(spans.server)
            )

    def buffer_wait_ended(self, record: RequestRecord) -> None:
        spans = self._spans.get(record)
        if spans is not None and spans.buffer is not None:
            spans.buffer.set_attribute("paddler.buffer_wait_seconds", record.buffer_wait)
            spans.buffer.end()
            spans.buffer = None

    def upstream_started(self, record: RequestRecord, agent: AgentController) -> None:
        spans = self._spans.get(record)
        if spans is None:
            return
        spans.upstream = self._tracer.start_span(
            f"upstream {record.method} {record.route}",
            context=trace.set_span_in_context(spans.server),
            kind=SpanKind.CLIENT,
            attributes={
                "paddler.agent": agent.name,
                "server.address": agent.address.host,
                "server.port": agent.address.port,
                "url.full": agent.url + record.path,
                "paddler.attempt": record.attempts,
            },
        )

    def upstream_headers(self, record: RequestRecord, headers: MutableMapping[str, str]) -> None:
        spans = self._spans.get(record)
        if spans is not None and spans.upstream is not None:
            inject(headers, context=trace.set_span_in_context(spans.upstream))

    def upstream_failed(self, record: RequestRecord, agent: AgentController, reason: str) -> None:
        spans = self._spans.get(record)
        if spans is not None and spans.upstream is not None:
            spans.upstream.set_status(Status(StatusCode.ERROR, reason))
            spans.upstream.end()
            spans.upstream = None

    def first_chunk(self, record: RequestRecord) -> None:
        spans = self._spans.get(record)
        if spans is not None:
            spans.server.add_event("first_token")

    def request_finished(self, record: RequestRecord) -> None:
        spans = self._spans.pop(record, None)
        if spans is None:
            return
        for open_span in (spans.buffer, spans.upstream):
            if open_span is not None:
                if record.status is not None:
                    open_span.set_attribute("http.response.status_code", record.status)
                open_span.end()
        server = spans.server
        if record.status is not None:
            server.set_attribute("http.response.status_code", record.status)
        if record.outcome is not None:
            server.set_attribute("paddler.outcome", record.outcome.value)
        if record.agent is not None:
            server.set_attribute("paddler.agent", record.agent.name)
        if record.failed:
            server.set_status(
                Status(StatusCode.ERROR, record.outcome.value if record.outcome else "")
            )
        server.end()
