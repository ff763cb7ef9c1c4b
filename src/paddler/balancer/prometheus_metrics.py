"""Prometheus metrics, served by the management port's ``GET /metrics``.

Two kinds of metric, kept apart:

- the fleet's state (agents, slots, buffered requests) is read from a pool snapshot at scrape
  time by ``FleetCollector``: nothing has to be kept in step, and an agent that leaves takes its
  series with it at the next scrape;
- what happened to requests (counters, histograms) is counted as it happens by
  ``PrometheusMetrics``, an observer of the proxy that also listens for circuit openings.

Each balancer has its own ``CollectorRegistry``: nothing is global, so two balancers in one
process (the tests) never share numbers.

Labels are bounded. ``route`` is a known llama.cpp route or ``other`` (see ``routes``). Counters
and histograms carry no agent label: agents come and go with autoscaling, and a counter's series
would outlive them. Per-agent state lives in gauges, which exist only while their agent does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from paddler.balancer.agent_controller import AgentController
from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.observers import Observer, Outcome, RequestRecord
from paddler.balancer.request_buffer import RequestBuffer
from paddler.balancer.routes import route_label
from paddler.balancer.routing import PrefixPolicy, RoutingPolicy
from paddler.protocol import LlamaCppState

_AGENT_LABELS = ("agent", "url", "model")

# Seconds. Waits are bounded by --request-buffer-timeout (60 s by default); generations can
# stream for minutes.
_BUFFER_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FIRST_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class FleetCollector:
    """Gauges of the fleet and of each agent, computed from a snapshot at every scrape."""

    def __init__(self, pool: AgentControllerPool, buffer: RequestBuffer) -> None:
        self._pool = pool
        self._buffer = buffer

    def collect(self) -> Iterator[Metric]:
        fleet = self._pool.snapshot()
        yield _gauge(
            "paddler_agents",
            "Agents registered with the balancer, in any state.",
            len(fleet.agents),
        )
        yield _gauge(
            "paddler_agents_usable",
            "Agents that can take requests: verified, llama.cpp ok and the circuit closed.",
            fleet.usable_agents,
        )
        yield _gauge("paddler_slots", "llama.cpp slots on usable agents.", fleet.slots_total)
        yield _gauge("paddler_slots_idle", "Free slots on usable agents.", fleet.slots_idle)
        yield _gauge(
            "paddler_slots_processing", "Busy slots on usable agents.", fleet.slots_processing
        )
        yield _gauge(
            "paddler_requests_buffered",
            "Requests waiting in the balancer's buffer for a free slot.",
            self._buffer.waiting,
        )
        per_agent = {
            "slots": GaugeMetricFamily(
                "paddler_agent_slots", "llama.cpp slots of one agent.", labels=_AGENT_LABELS
            ),
            "idle": GaugeMetricFamily(
                "paddler_agent_slots_idle", "Free slots of one agent.", labels=_AGENT_LABELS
            ),
            "processing": GaugeMetricFamily(
                "paddler_agent_slots_processing",
                "Busy slots of one agent (reserved by the balancer, or used by other traffic).",
                labels=_AGENT_LABELS,
            ),
            "usable": GaugeMetricFamily(
                "paddler_agent_usable",
                "1 if the agent can take requests (verified, llama.cpp ok, circuit closed), else 0.",
                labels=_AGENT_LABELS,
            ),
        }
        for agent in fleet.agents:
            labels = [agent.name, agent.url, ",".join(agent.models)]
            usable = agent.verified and agent.state == LlamaCppState.OK and not agent.circuit_open
            per_agent["slots"].add_metric(labels, agent.slots_total)
            per_agent["idle"].add_metric(labels, agent.slots_idle)
            per_agent["processing"].add_metric(labels, agent.slots_processing)
            per_agent["usable"].add_metric(labels, 1 if usable else 0)
        yield from per_agent.values()


class RoutingCollector:
    """What routing decided, what llama.cpp found in its prompt cache, and the prefix index."""

    def __init__(self, pool: AgentControllerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        policy: RoutingPolicy = self._pool.policy
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
        if isinstance(policy, PrefixPolicy):
            index = policy.index
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
        prefill = GaugeMetricFamily(
            "paddler_agent_prefill_tokens_per_second",
            "Measured prompt tokens one agent's llama.cpp computes per second (running average).",
            labels=_AGENT_LABELS,
        )
        hold = GaugeMetricFamily(
            "paddler_agent_slot_hold_seconds",
            "Measured time a request holds one of the agent's slots (running average).",
            labels=_AGENT_LABELS,
        )
        for agent in self._pool.agents():
            labels = [agent.name, agent.url, ",".join(agent.status.models)]
            if agent.prefill_rate is not None:
                prefill.add_metric(labels, agent.prefill_rate)
            if agent.slot_hold is not None:
                hold.add_metric(labels, agent.slot_hold)
        yield prefill
        yield hold


class PrometheusMetrics(Observer):
    """The balancer's metrics registry: fleet gauges, request counters and histograms."""

    def __init__(self, pool: AgentControllerPool, buffer: RequestBuffer) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(pool, buffer))
        self.registry.register(RoutingCollector(pool))
        registry = self.registry
        self._requests = Counter(
            "paddler_requests",
            "Proxied requests by route, HTTP status sent to the client and outcome.",
            ["route", "status", "outcome"],
            registry=registry,
        )
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
        self._buffer_wait = Histogram(
            "paddler_buffer_wait_seconds",
            "Time a request spent waiting for a slot, over all its attempts.",
            ["route"],
            buckets=_BUFFER_WAIT_BUCKETS,
            registry=registry,
        )
        self._first_chunk = Histogram(
            "paddler_time_to_first_chunk_seconds",
            "Time from a request's arrival to the first response chunk relayed to the client "
            "(the first token, for a streamed generation).",
            ["route"],
            buckets=_FIRST_CHUNK_BUCKETS,
            registry=registry,
        )
        self._duration = Histogram(
            "paddler_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        # Requests that reached the buffer; those refused before it (body too large, client gone
        # while sending it) have no wait to observe.
        self._buffered: set[RequestRecord] = set()
        self._requests_by = _Children(self._requests)
        self._buffer_wait_by = _Children(self._buffer_wait)
        self._first_chunk_by = _Children(self._first_chunk)
        self._duration_by = _Children(self._duration)
        pool.on_circuit_open(self._circuit_opened)

    def handler(self) -> Handler:
        """The aiohttp handler for ``GET /metrics`` (text or OpenMetrics, as Accept asks)."""
        return make_aiohttp_handler(self.registry)

    def exposition(self) -> str:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry).decode()

    # -- observer hooks ---------------------------------------------------------------------

    def buffer_wait_started(self, record: RequestRecord) -> None:
        self._buffered.add(record)

    def retried(self, record: RequestRecord, agent: AgentController) -> None:
        self._retries.labels(record.route).inc()

    def upstream_failed(self, record: RequestRecord, agent: AgentController, reason: str) -> None:
        self._upstream_failures.labels(reason).inc()

    def first_chunk(self, record: RequestRecord) -> None:
        if record.time_to_first_chunk is not None:
            self._first_chunk_by(record.route).observe(record.time_to_first_chunk)

    def request_finished(self, record: RequestRecord) -> None:
        outcome = record.outcome.value if record.outcome is not None else "unknown"
        status = str(record.status) if record.status is not None else "none"
        self._requests_by(record.route, status, outcome).inc()
        if record.outcome is Outcome.BUFFER_FULL:
            self._buffer_overflows.inc()
        elif record.outcome is Outcome.BUFFER_TIMEOUT:
            self._buffer_timeouts.inc()
        if record in self._buffered:
            self._buffered.discard(record)
            self._buffer_wait_by(record.route).observe(record.buffer_wait)
        if record.duration is not None:
            self._duration_by(record.route).observe(record.duration)

    def unauthorized(self, path: str) -> None:
        self._requests.labels(route_label(path), "401", Outcome.UNAUTHORIZED.value).inc()

    def _circuit_opened(self, agent: AgentController) -> None:
        self._circuit_openings.inc()


class _Children:
    """A metric's children by label values, from a dict. ``labels()`` checks its arguments,
    converts them and takes a lock at every call; the proxy asks for the same few children for
    every request (label values are bounded: routes, statuses, outcomes)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
