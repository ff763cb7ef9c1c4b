"""The Prometheus registry against a pool and buffer in memory: what each metric counts."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.observability.observers import Outcome, RequestRecord
from paddler.balancer.observability.prometheus_metrics import PrometheusMetrics
from paddler.config import Address
from tests.support.balancer import ok
from tests.support.pool import join
from tests.support.prometheus import sample


def metrics_for(pool: AgentControllerPool) -> PrometheusMetrics:
    buffer = RequestBuffer(pool, size=4, timeout=1.0)
    return PrometheusMetrics(FleetView(pool), pool, buffer, pool.policy)


def record(route: str = "/completion") -> RequestRecord:
    return RequestRecord(id="r", method="POST", path=route, route=route, needs_slot=True)


def finish(
    metrics: PrometheusMetrics, request: RequestRecord, status: int | None, outcome: Outcome
) -> None:
    request.status = status
    request.outcome = outcome
    request.ended = request.started + 0.5
    metrics.request_finished(request)


async def test_fleet_gauges_of_a_small_fleet_are_read_at_scrape_time() -> None:
    """Agents and slots are whatever a small fleet's pool holds at the moment of the scrape."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    assert sample(await metrics.exposition(), "paddler_slots") == 0
    join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=3, processing=1))
    join(pool, "b", Address("http", "10.0.0.2", 8088), ok(idle=2))
    text = await metrics.exposition()
    assert sample(text, "paddler_agents") == 2
    assert sample(text, "paddler_agents_usable") == 2
    assert sample(text, "paddler_slots") == 6
    assert sample(text, "paddler_slots_idle") == 5
    assert sample(text, "paddler_slots_processing") == 1
    assert sample(text, "paddler_requests_buffered") == 0


async def test_per_agent_gauges_carry_agent_url_and_model_labels() -> None:
    """Each agent's slots and usability are labelled with its name, address and models."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=3, processing=1, models=("q",)))
    labels = {"agent": "a", "url": "http://10.0.0.1:8088", "model": "q"}
    text = await metrics.exposition()
    assert sample(text, "paddler_agent_slots", **labels) == 4
    assert sample(text, "paddler_agent_slots_idle", **labels) == 3
    assert sample(text, "paddler_agent_slots_processing", **labels) == 1
    assert sample(text, "paddler_agent_usable", **labels) == 1


async def test_an_open_circuit_makes_the_agent_unusable_and_is_counted() -> None:
    """A tripped agent shows usable 0, and the opening counts once however often it trips."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    agent, _ = join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=2))
    pool.trip(agent, "refused")
    pool.trip(agent, "refused again")
    text = await metrics.exposition()
    assert sample(text, "paddler_agent_usable", agent="a") == 0
    assert sample(text, "paddler_slots") == 0
    assert sample(text, "paddler_circuit_openings_total") == 1


async def test_an_agent_that_leaves_takes_its_series_with_it() -> None:
    """Per-agent gauges exist only while the agent does."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    agent, session = join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=2))
    pool.remove(agent, session, "deregistered")
    assert sample(await metrics.exposition(), "paddler_agent_slots", agent="a") is None


async def test_requests_are_counted_by_route_status_and_outcome() -> None:
    """Each finished request counts once under its route, status and outcome."""
    metrics = metrics_for(AgentControllerPool())
    finish(metrics, record(), 200, Outcome.COMPLETED)
    finish(metrics, record(), 200, Outcome.COMPLETED)
    finish(metrics, record("/tokenize"), None, Outcome.CLIENT_GONE)
    text = await metrics.exposition()
    completed = {"route": "/completion", "status": "200", "outcome": "completed"}
    assert sample(text, "paddler_requests_total", **completed) == 2
    gone = {"route": "/tokenize", "status": "none", "outcome": "client_gone"}
    assert sample(text, "paddler_requests_total", **gone) == 1
    assert sample(text, "paddler_request_duration_seconds_count", route="/completion") == 2


async def test_buffer_overflows_and_timeouts_have_their_own_counters() -> None:
    """A full buffer and a buffer timeout each count in a counter of their own."""
    metrics = metrics_for(AgentControllerPool())
    finish(metrics, record(), 503, Outcome.BUFFER_FULL)
    finish(metrics, record(), 504, Outcome.BUFFER_TIMEOUT)
    finish(metrics, record(), 504, Outcome.BUFFER_TIMEOUT)
    text = await metrics.exposition()
    assert sample(text, "paddler_buffer_overflows_total") == 1
    assert sample(text, "paddler_buffer_timeouts_total") == 2


async def test_only_requests_that_reached_the_buffer_observe_a_wait() -> None:
    """A request refused before the buffer (body too large) adds no zero wait."""
    metrics = metrics_for(AgentControllerPool())
    waited = record()
    metrics.buffer_wait_started(waited)
    waited.buffer_wait = 0.3
    finish(metrics, waited, 200, Outcome.COMPLETED)
    finish(metrics, record(), 413, Outcome.REFUSED)
    text = await metrics.exposition()
    assert sample(text, "paddler_buffer_wait_seconds_count", route="/completion") == 1
    assert sample(text, "paddler_buffer_wait_seconds_sum", route="/completion") == 0.3


async def test_each_balancer_has_its_own_registry() -> None:
    """Two registries in one process never share a count."""
    first = metrics_for(AgentControllerPool())
    second = metrics_for(AgentControllerPool())
    finish(first, record(), 503, Outcome.BUFFER_FULL)
    assert sample(await first.exposition(), "paddler_buffer_overflows_total") == 1
    assert sample(await second.exposition(), "paddler_buffer_overflows_total") == 0


async def test_text_and_openmetrics_carry_the_same_agent_series() -> None:
    """Both formats parse to the same per-agent samples, with quotes and backslashes escaped."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    agent, _ = join(pool, 'gpu "one" \\ a', Address("http", "10.0.0.1", 8088), ok(idle=2))
    agent.prefill_rate = 1234.5
    encoder, content_type = choose_encoder("application/openmetrics-text;version=1.0.0")
    openmetrics = (await metrics.render(encoder, content_type)).decode()
    text = await metrics.exposition()
    assert openmetrics.endswith("# EOF\n")
    assert openmetrics.count("# EOF") == 1

    def per_agent(families: Iterable[Metric]) -> dict[str, tuple[dict[str, str], float]]:
        return {
            found.name: (found.labels, found.value)
            for family in families
            if family.name.startswith("paddler_agent_")
            for found in family.samples
        }

    from_text = per_agent(text_string_to_metric_families(text))
    assert from_text == per_agent(openmetrics_families(openmetrics))
    labels = {"agent": 'gpu "one" \\ a', "model": "", "url": "http://10.0.0.1:8088"}
    assert from_text["paddler_agent_slots_idle"] == (labels, 2)
    assert from_text["paddler_agent_prefill_tokens_per_second"] == (labels, 1234.5)
    assert "paddler_agent_slot_hold_seconds" not in from_text


async def test_a_scraper_can_ask_for_some_families_only() -> None:
    """``name[]`` keeps the series it names (a counter by its ``_total``), fleet's and others'."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=2))
    names = ["paddler_slots_idle", "paddler_agent_usable", "paddler_buffer_overflows_total"]
    text = (await metrics.render(generate_latest, "text/plain", names)).decode()
    assert {family.name for family in text_string_to_metric_families(text)} == {
        "paddler_slots_idle",
        "paddler_agent_usable",
        "paddler_buffer_overflows",
    }


async def test_request_histograms_read_as_prometheus_clients_own() -> None:
    """Buckets (a value on a bound counts in it), sums, counts and series order are those of a
    ``prometheus_client.Histogram`` fed the same values."""
    from prometheus_client import CollectorRegistry, Histogram

    from paddler.balancer.observability.request_counts import RequestHistogram

    bounds = (0.01, 0.1, 1, 10)
    values = [("/a", 0.0), ("/b", 0.01), ("/a", 0.1000001), ("/a", 10), ("/b", 11.5), ("/a", 1)]
    theirs = CollectorRegistry()
    reference = Histogram("h_seconds", "H.", ["route"], buckets=bounds, registry=theirs)
    ours = CollectorRegistry()
    counted = RequestHistogram("h_seconds", "H.", ["route"], bounds)
    ours.register(counted)
    for route, value in values:
        reference.labels(route).observe(value)
        counted.observe((route,), value)

    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [
            (found.name, found.labels, found.value)
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for found in family.samples
            if not found.name.endswith("_created")
        ]

    assert samples(ours) == samples(theirs)
