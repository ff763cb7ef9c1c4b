"""Prometheus metrics, served by the management port's ``GET /metrics``.

Two kinds of metric, kept apart:

- the fleet's state (agents, slots, buffered requests) is rendered from the fleet view's
  latest reading by ``prometheus_fleet`` (see ``fleet_view`` for how fresh that is): nothing has
  to be kept in step, and an agent that leaves takes its series with it at the next reading;
- what happened to requests (counters, histograms) is counted as it happens by
  ``PrometheusMetrics``, an observer of the proxy that also listens for circuit openings.

Each balancer has its own ``CollectorRegistry``: nothing is global, so two balancers in one
process (the tests) never share numbers.

Labels are bounded. ``route`` is a known llama.cpp route or ``other`` (see ``routes``). Counters
and histograms carry no agent label: agents come and go with autoscaling, and a counter's series
would outlive them. Per-agent state lives in gauges, which exist only while their agent does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.observability.observers import Observer, Outcome, RequestRecord
from paddler.balancer.observability.prometheus_fleet import Encoder, Families, FleetGauges
from paddler.balancer.observability.request_counts import RequestCounter, RequestHistogram
from paddler.balancer.proxy.routes import route_label
from paddler.balancer.routing.policies import RoutingPolicy

_EOF = b"# EOF\n"

# Seconds. Waits are bounded by --request-buffer-timeout (60 s by default); generations can
# stream for minutes.
_BUFFER_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FIRST_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RoutingCollector:
    """What routing decided, what llama.cpp found in its prompt cache, and the prefix index."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        policy = self._policy
        stats = policy.stats
        decisions = CounterMetricFamily(
            "paddler_routing_decisions",
            "Requests sent to an agent, by what decided it: prefix (the agent probably held "
            "part of the prompt in cache) or load.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.decisions.items()):
            decisions.add_metric([reason], count)
        yield decisions
        yield CounterMetricFamily(
            "paddler_prompt_tokens",
            "Prompt tokens of generations, as llama.cpp counted them (timings cache_n + prompt_n).",
            value=stats.prompt_tokens,
        )
        yield CounterMetricFamily(
            "paddler_prompt_tokens_cached",
            "Prompt tokens llama.cpp reused from its prompt cache (timings cache_n).",
            value=stats.cached_tokens,
        )
        yield CounterMetricFamily(
            "paddler_prompt_tokens_cached_predicted",
            "Prompt tokens the prefix index expected the chosen agent to hold in cache.",
            value=stats.predicted_cached_tokens,
        )
        actual, predicted = stats.recent_hit_ratio()
        ratio = GaugeMetricFamily(
            "paddler_prompt_cache_hit_ratio",
            "Share of prompt tokens found in llama.cpp's cache over the last 256 generations: "
            "actual (reported by llama.cpp) and predicted (by the prefix index).",
            labels=["source"],
        )
        ratio.add_metric(["actual"], actual)
        ratio.add_metric(["predicted"], predicted)
        yield ratio
        index = policy.index
        if index is not None:
            yield _gauge(
                "paddler_prefix_index_bytes",
                "Estimated memory held by the prefix index.",
                index.memory_bytes,
            )
            yield _gauge(
                "paddler_prefix_index_bytes_limit",
                "Most memory the prefix index may hold (--prefix-index-memory).",
                index.memory_limit,
            )
            yield _gauge(
                "paddler_prefix_index_blocks",
                "Prompt blocks the prefix index remembers.",
                index.blocks,
            )
            yield CounterMetricFamily(
                "paddler_prefix_index_evictions",
                "Blocks the prefix index forgot to stay within its memory limit.",
                value=index.evictions,
            )


class PrometheusMetrics(Observer):
    """The balancer's metrics registry: fleet gauges, request counters and histograms."""

    def __init__(
        self,
        view: FleetView,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        policy: RoutingPolicy,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RoutingCollector(policy))
        self._fleet = FleetGauges(view, buffer)
        registry = self.registry
        # Counted for every request: plain numbers, read at scrape time (``request_counts``).
        self._requests = RequestCounter(
            "paddler_requests",
            "Proxied requests by route, HTTP status sent to the client and outcome.",
            ["route", "status", "outcome"],
        )
        registry.register(self._requests)
        self._retries = Counter(
            "paddler_request_retries",
            "Attempts on another agent after one failed before answering.",
            ["route"],
            registry=registry,
        )
        self._upstream_failures = Counter(
            "paddler_upstream_failures",
            "Failed attempts at an agent, by reason (connect_failed, disconnected, "
            "status_<code>, broke_mid_response).",
            ["reason"],
            registry=registry,
        )
        self._circuit_openings = Counter(
            "paddler_circuit_openings",
            "Times an agent was taken out of rotation after failing.",
            registry=registry,
        )
        self._buffer_overflows = Counter(
            "paddler_buffer_overflows",
            "Requests refused with 503 because the buffer was full.",
            registry=registry,
        )
        self._buffer_timeouts = Counter(
            "paddler_buffer_timeouts",
            "Requests answered 504 because no slot freed up within the buffer timeout.",
            registry=registry,
        )
        self._buffer_wait = RequestHistogram(
            "paddler_buffer_wait_seconds",
            "Time a request spent waiting for a slot, over all its attempts.",
            ["route"],
            _BUFFER_WAIT_BUCKETS,
        )
        self._first_chunk = RequestHistogram(
            "paddler_time_to_first_chunk_seconds",
            "Time from a request's arrival to the first response chunk relayed to the client "
            "(the first token, for a streamed generation).",
            ["route"],
            _FIRST_CHUNK_BUCKETS,
        )
        self._duration = RequestHistogram(
            "paddler_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route"],
            _DURATION_BUCKETS,
        )
        for counted in (self._buffer_wait, self._first_chunk, self._duration):
            registry.register(counted)
        # Requests that reached the buffer; those refused before it (body too large, client gone
        # while sending it) have no wait to observe.
        self._buffered: set[RequestRecord] = set()
        pool.on_circuit_open(self._circuit_opened)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics``: text or OpenMetrics, as Accept asks; gzip if the scraper takes it
        (aiohttp compresses a body this large in a thread); ``name[]`` selects families."""
        accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
        encoder, content_type = choose_encoder(accept)
        names = request.query.getall("name[]", None)
        body = await self.render(encoder, content_type, names)
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})
        response.enable_compression()
        return response

    async def render(
        self, encoder: Encoder, content_type: str, names: Collection[str] | None = None
    ) -> bytes:
        """Every metric, as ``encoder`` writes them: what happened, then the fleet."""
        registry: Collector = self.registry
        if names is not None:
            registry = self.registry.restricted_registry(names)
        # prometheus_client takes about 10 µs a line, and a histogram has 15 lines per route:
        # one family at a time, letting requests run between them.
        parts: list[bytes] = []
        for family in registry.collect():
            parts.append(encoder(Families([family])).removesuffix(_EOF))
            await asyncio.sleep(0)
        parts.append(await self._fleet.exposition(encoder, content_type, names))
        if encoder(Families([])).endswith(_EOF):
            parts.append(_EOF)
        return b"".join(parts)

    async def exposition(self) -> str:
        """Every metric in the Prometheus text format."""
        return (await self.render(generate_latest, CONTENT_TYPE_PLAIN_0_0_4)).decode()

    # -- observer hooks ---------------------------------------------------------------------

    def buffer_wait_started(self, record: RequestRecord) -> None:
        self._buffered.add(record)

    def retried(self, record: RequestRecord, agent: AgentController) -> None:
        self._retries.labels(record.route).inc()

    def upstream_failed(self, record: RequestRecord, agent: AgentController, reason: str) -> None:
        self._upstream_failures.labels(reason).inc()

    def first_chunk(self, record: RequestRecord) -> None:
        if record.first_chunk_at is not None:
            self._first_chunk.observe((record.route,), record.first_chunk_at - record.started)

    def request_finished(self, record: RequestRecord) -> None:
        outcome = record.outcome
        status = record.status
        route = record.route
        self._requests.count(
            (
                route,
                _STATUSES.get(status) or _status(status),
                # The member itself: a StrEnum is its value (as a label and as a key), and
                # ``.value`` is a Python-level descriptor.
                outcome if outcome is not None else "unknown",
            )
        )
        if outcome is Outcome.BUFFER_FULL:
            self._buffer_overflows.inc()
        elif outcome is Outcome.BUFFER_TIMEOUT:
            self._buffer_timeouts.inc()
        route_key = (route,)
        buffered = self._buffered
        if record in buffered:
            buffered.discard(record)
            self._buffer_wait.observe(route_key, record.buffer_wait)
        if record.ended is not None:
            self._duration.observe(route_key, record.ended - record.started)

    def unauthorized(self, path: str) -> None:
        self._requests.count((route_label(path), "401", Outcome.UNAUTHORIZED.value))

    def _circuit_opened(self, agent: AgentController) -> None:
        self._circuit_openings.inc()


_STATUSES: dict[int | None, str] = {None: "none"}
"""Status labels by status: the same few for nearly every request."""


def _status(status: int | None) -> str:
    label = _STATUSES[status] = str(status)
    return label


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
