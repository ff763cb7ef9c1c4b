"""OpenTelemetry: each proxied request is a trace, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from paddler.telemetry import provider_from_environment, tracing_requested
from tests.e2e.test_fleet import TOKEN
from tests.support.agent import running_agent
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.llamacpp import running_llamacpp
from tests.support.upstream import fake_upstream

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (span,) = [span for span in spans if span.name == name]
    return span


async def test_a_streamed_request_is_one_trace_with_buffer_upstream_and_first_token(
    session: aiohttp.ClientSession, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Against real llama.cpp: server span, buffer-wait span, upstream span, first-token event."""
    async with (
        running_balancer(tracer_provider=provider, management_token=TOKEN) as running,
        running_llamacpp(slots=1) as server,
        running_agent(
            llamacpp_port=server.port,
            management_port=running.balancer.management_port or 0,
            name="traced",
            token=TOKEN,
        ),
    ):
        await wait_until(lambda: any(agent.usable() for agent in running.pool.agents()), 30)
        async with session.post(
            f"{running.proxy_url}/completion",
            json={"prompt": "hi", "n_predict": 8, "ignore_eos": True, "stream": True},
            headers={"traceparent": CLIENT_TRACEPARENT},
        ) as response:
            assert response.status == 200
            await response.read()
        await wait_until(lambda: len(exporter.get_finished_spans()) == 3)
    spans = exporter.get_finished_spans()
    server_span = by_name(spans, "POST /completion")
    buffer_span = by_name(spans, "buffer wait")
    upstream_span = by_name(spans, "upstream POST /completion")
    assert server_span.kind is SpanKind.SERVER
    assert format(server_span.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert server_span.attributes is not None
    assert server_span.attributes["http.response.status_code"] == 200
    assert server_span.attributes["paddler.agent"] == "traced"
    assert [event.name for event in server_span.events] == ["first_token"]
    for child in (buffer_span, upstream_span):
        assert child.parent is not None
        assert child.parent.span_id == server_span.context.span_id
    assert upstream_span.kind is SpanKind.CLIENT
    assert upstream_span.attributes is not None
    assert upstream_span.attributes["paddler.agent"] == "traced"
    assert upstream_span.attributes["server.address"] == "127.0.0.1"
    assert upstream_span.attributes["server.port"] == server.port


async def test_traceparent_reaches_the_upstream_as_the_upstream_span(
    session: aiohttp.ClientSession, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """llama.cpp receives a W3C traceparent naming the balancer's upstream span."""
    seen: list[str] = []

    async def record_headers(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        return web.json_response({})

    async with (
        fake_upstream(record_headers) as port,
        running_balancer(tracer_provider=provider) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("echo", port, ok(idle=1))
        async with session.get(
            f"{running.proxy_url}/slots", headers={"traceparent": CLIENT_TRACEPARENT}
        ) as response:
            assert response.status == 200
    upstream_span = by_name(exporter.get_finished_spans(), "upstream GET /slots")
    (traceparent,) = seen
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, flags) == ("00", "01")
    assert trace_id == CLIENT_TRACE_ID
    assert span_id == format(upstream_span.context.span_id, "016x")


async def test_failed_attempts_are_error_spans(
    session: aiohttp.ClientSession, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A refused connection shows as an upstream span in error, then the retry's span."""

    async def fine(request: web.Request) -> web.Response:
        return web.json_response({})

    async with fake_upstream(fine) as port, running_balancer(tracer_provider=provider) as running:
        dead = ScriptedAgent(session, running.management_url)
        await dead.register_departed("dead", ok(idle=5))
        good = ScriptedAgent(session, running.management_url)
        await good.register("good", port, ok(idle=1))
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 200
    upstreams = [s for s in exporter.get_finished_spans() if s.name.startswith("upstream")]
    assert [span.status.status_code for span in upstreams] == [StatusCode.ERROR, StatusCode.UNSET]


def test_tracing_is_off_unless_the_environment_asks() -> None:
    """No OTEL_* variables: no tracer; an OTLP endpoint or exporter turns it on."""
    assert provider_from_environment({}) is None
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    provider = provider_from_environment({"OTEL_TRACES_EXPORTER": "otlp"})
    assert provider is not None
    provider.shutdown()
