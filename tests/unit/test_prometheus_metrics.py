"""The Prometheus registry against a pool and buffer in memory: what each metric counts."""

from __future__ import annotations

from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.observers import Outcome, RequestRecord
from paddler.balancer.prometheus_metrics import PrometheusMetrics
from paddler.balancer.request_buffer import RequestBuffer
from paddler.config import Address
from tests.support.balancer import ok
from tests.support.pool import join
from tests.support.prometheus import sample


def metrics_for(pool: AgentControllerPool) -> PrometheusMetrics:
    return PrometheusMetrics(pool, RequestBuffer(pool, size=4, timeout=1.0))


def record(route: str = "/completion") -> RequestRecord:
    return RequestRecord(id="r", method="POST", path=route, route=route, needs_slot=True)


def finish(
    metrics: PrometheusMetrics, request: RequestRecord, status: int | None, outcome: Outcome
) -> None:
    request.status = status
    request.outcome = outcome
    request.ended = request.started + 0.5
    metrics.request_finished(request)


def test_fleet_gauges_are_read_from_the_pool_at_scrape_time() -> None:
    """Agents and slots are whatever the pool holds at the moment of the scrape."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    assert sample(metrics.exposition(), "paddler_slots") == 0
    join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=3, processing=1))
    join(pool, "b", Address("http", "10.0.0.2", 8088), ok(idle=2))
    text = metrics.exposition()
    assert sample(text, "paddler_agents") == 2
    assert sample(text, "paddler_agents_usable") == 2
    assert sample(text, "paddler_slots") == 6
    assert sample(text, "paddler_slots_idle") == 5
    assert sample(text, "paddler_slots_processing") == 1
    assert sample(text, "paddler_requests_buffered") == 0


def test_per_agent_gauges_carry_agent_url_and_model_labels() -> None:
    """Each agent's slots and usability are labelled with its name, address and models."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=3, processing=1, models=("q",)))
    labels = {"agent": "a", "url": "http://10.0.0.1:8088", "model": "q"}
    text = metrics.exposition()
    assert sample(text, "paddler_agent_slots", **labels) == 4
    assert sample(text, "paddler_agent_slots_idle", **labels) == 3
    assert sample(text, "paddler_agent_slots_processing", **labels) == 1
    assert sample(text, "paddler_agent_usable", **labels) == 1


def test_an_open_circuit_makes_the_agent_unusable_and_is_counted() -> None:
    """A tripped agent shows usable 0, and the opening counts once however often it trips."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    agent, _ = join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=2))
    pool.trip(agent, "refused")
    pool.trip(agent, "refused again")
    text = metrics.exposition()
    assert sample(text, "paddler_agent_usable", agent="a") == 0
    assert sample(text, "paddler_slots") == 0
    assert sample(text, "paddler_circuit_openings_total") == 1


def test_an_agent_that_leaves_takes_its_series_with_it() -> None:
    """Per-agent gauges exist only while the agent does."""
    pool = AgentControllerPool()
    metrics = metrics_for(pool)
    agent, session = join(pool, "a", Address("http", "10.0.0.1", 8088), ok(idle=2))
    pool.remove(agent, session, "deregistered")
    assert sample(metrics.exposition(), "paddler_agent_slots", agent="a") is None


def test_requests_are_counted_by_route_status_and_outcome() -> None:
    """Each finished request counts once under its route, status and outcome."""
    metrics = metrics_for(AgentControllerPool())
    finish(metrics, record(), 200, Outcome.COMPLETED)
    finish(metrics, record(), 200, Outcome.COMPLETED)
    finish(metrics, record("/tokenize"), None, Outcome.CLIENT_GONE)
    text = metrics.exposition()
    completed = {"route": "/completion", "status": "200", "outcome": "completed"}
    assert sample(text, "paddler_requests_total", **completed) == 2
    gone = {"route": "/tokenize", "status": "none", "outcome": "client_gone"}
    assert sample(text, "paddler_requests_total", **gone) == 1
    assert sample(text, "paddler_request_duration_seconds_count", route="/completion") == 2


def test_buffer_overflows_and_timeouts_have_their_own_counters() -> None:
    """A full buffer and a buffer timeout each count in a counter of their own."""
    metrics = metrics_for(AgentControllerPool())
    finish(metrics, record(), 503, Outcome.BUFFER_FULL)
    finish(metrics, record(), 504, Outcome.BUFFER_TIMEOUT)
    finish(metrics, record(), 504, Outcome.BUFFER_TIMEOUT)
    text = metrics.exposition()
    assert sample(text, "paddler_buffer_overflows_total") == 1
    assert sample(text, "paddler_buffer_timeouts_total") == 2


def test_only_requests_that_reached_the_buffer_observe_a_wait() -> None:
    """A request refused before the buffer (body too large) adds no zero wait."""
    metrics = metrics_for(AgentControllerPool())
    waited = record()
    metrics.buffer_wait_started(waited)
    waited.buffer_wait = 0.3
    finish(metrics, waited, 200, Outcome.COMPLETED)
    finish(metrics, record(), 413, Outcome.REFUSED)
    text = metrics.exposition()
    assert sample(text, "paddler_buffer_wait_seconds_count", route="/completion") == 1
    assert sample(text, "paddler_buffer_wait_seconds_sum", route="/completion") == 0.3


def test_each_balancer_has_its_own_registry() -> None:
    """Two registries in one process never share a count."""
    first = metrics_for(AgentControllerPool())
    second = metrics_for(AgentControllerPool())
    finish(first, record(), 503, Outcome.BUFFER_FULL)
    assert sample(first.exposition(), "paddler_buffer_overflows_total") == 1
    assert sample(second.exposition(), "paddler_buffer_overflows_total") == 0
