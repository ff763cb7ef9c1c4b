"""Stats history: per-second counts, error classification, gauges, and a bounded ring."""

from __future__ import annotations

import asyncio

import pytest

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.observability.observers import Outcome, RequestRecord
from paddler.balancer.observability.stats_history import StatsHistory, is_error
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join

START = 1_790_000_000


class Clock:
    def __init__(self, now: float = START + 0.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(outcome: Outcome = Outcome.COMPLETED, status: int | None = 200) -> RequestRecord:
    finished = RequestRecord(
        id="r", method="POST", path="/completion", route="/completion", needs_slot=True
    )
    finished.outcome = outcome
    finished.status = status
    return finished


@pytest.fixture
def pool() -> AgentControllerPool:
    return AgentControllerPool()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def history(pool: AgentControllerPool, clock: Clock) -> StatsHistory:
    return StatsHistory(
        FleetView(pool), RequestBuffer(pool, size=10, timeout=5), window=5, clock=clock
    )


def test_requests_and_errors_are_counted_in_the_second_they_finish(
    history: StatsHistory, clock: Clock
) -> None:
    """Each finished request counts once in its second; failures count as errors too."""
    history.request_finished(record())
    history.request_finished(record(Outcome.UPSTREAM_FAILED, 502))
    clock.now += 1
    history.request_finished(record())
    clock.now += 1
    series = history.series()
    assert [(entry["t"], entry["requests"], entry["errors"]) for entry in series] == [
        (START, 2, 1),
        (START + 1, 1, 0),
    ]


@pytest.mark.parametrize(
    ("outcome", "status", "error"),
    [
        (Outcome.COMPLETED, 200, False),
        (Outcome.COMPLETED, 404, False),
        (Outcome.CLIENT_GONE, None, False),
        (Outcome.CLIENT_GONE, 200, False),
        (Outcome.COMPLETED, 500, True),
        (Outcome.CLIENT_GONE, 502, True),
        (Outcome.UPSTREAM_FAILED, 502, True),
        (Outcome.BUFFER_FULL, 503, True),
        (Outcome.BUFFER_TIMEOUT, 504, True),
        (Outcome.REFUSED, 413, True),
        (Outcome.SHUTTING_DOWN, 503, True),
    ],
)
def test_errors_are_bad_outcomes_or_server_errors(
    outcome: Outcome, status: int | None, error: bool
) -> None:
    """An error is any outcome but completed or client gone, or any status of 500 or more."""
    assert is_error(record(outcome, status)) is error


def test_the_second_in_progress_is_not_served(history: StatsHistory) -> None:
    """Only complete seconds are served, so an entry never changes once a reader saw it."""
    history.request_finished(record())
    assert history.series() == []


def test_the_ring_keeps_only_the_last_window_of_seconds(
    history: StatsHistory, clock: Clock
) -> None:
    """After many seconds the series holds exactly the window, oldest first, and no more."""
    for _ in range(50):
        history.request_finished(record())
        clock.now += 1
    series = history.series()
    assert [entry["t"] for entry in series] == list(range(START + 45, START + 50))
    assert all(entry["requests"] == 1 for entry in series)
    assert len(history._ring) == history.window + 1


def test_seconds_older_than_the_window_are_not_served_after_a_quiet_spell(
    history: StatsHistory, clock: Clock
) -> None:
    """A bucket left over from long ago is never mistaken for a recent second."""
    history.request_finished(record())
    clock.now += 6  # exactly one ring's length later: the same index, another second
    history.request_finished(record())
    clock.now += 1
    series = history.series()
    assert [entry["t"] for entry in series] == list(range(START + 2, START + 7))
    assert [entry["requests"] for entry in series] == [0, 0, 0, 0, 1]


async def test_samples_record_the_buffer_and_the_usable_slots(
    pool: AgentControllerPool, history: StatsHistory, clock: Clock
) -> None:
    """A sample stores the buffered requests and the slots of usable agents in its second."""
    join(
        pool,
        "a",
        Address("http", "127.0.0.1", 1),
        Status(state=LlamaCppState.OK, slots_idle=1, slots_processing=3),
    )
    join(
        pool,
        "broken",
        Address("http", "127.0.0.1", 2),
        Status(state=LlamaCppState.ERROR, slots_idle=4, error="unreachable"),
    )
    history.sample(await FleetView(pool).totals())
    clock.now += 1
    [entry] = history.series()
    assert entry == {
        "t": START,
        "requests": 0,
        "errors": 0,
        "requests_buffered": 0,
        "slots_processing": 3,
        "slots_total": 4,
    }


async def test_buffered_requests_are_sampled(pool: AgentControllerPool, clock: Clock) -> None:
    """Requests waiting in the buffer show up in the next sample."""
    buffer = RequestBuffer(pool, size=10, timeout=5)
    history = StatsHistory(FleetView(pool), buffer, window=5, clock=clock)
    waiters = [asyncio.create_task(buffer.acquire(Demand(True))) for _ in range(2)]
    for _ in range(5):
        await asyncio.sleep(0)  # the waiters join the queue
    assert buffer.waiting == 2
    history.sample(await FleetView(pool).totals())
    clock.now += 1
    assert history.series()[0]["requests_buffered"] == 2
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_unsampled_seconds_repeat_the_last_sample(
    pool: AgentControllerPool, history: StatsHistory, clock: Clock
) -> None:
    """A second nobody sampled shows the gauges of the last sample, not zeros."""
    join(
        pool,
        "a",
        Address("http", "127.0.0.1", 1),
        Status(state=LlamaCppState.OK, slots_idle=2, slots_processing=2),
    )
    history.sample(await FleetView(pool).totals())
    clock.now += 1
    history.request_finished(record())
    clock.now += 2
    series = history.series()
    assert [(entry["requests"], entry["slots_processing"]) for entry in series] == [
        (0, 2),
        (1, 2),
        (0, 2),
    ]
    assert {entry["slots_total"] for entry in series} == {4}


async def test_the_json_follows_the_published_contract(
    pool: AgentControllerPool, history: StatsHistory, clock: Clock
) -> None:
    """``as_json`` has exactly the fields the dashboards read."""
    history.sample(await FleetView(pool).totals())
    clock.now += 1
    body = history.as_json()
    assert set(body) == {"interval_seconds", "window_seconds", "series"}
    assert body["interval_seconds"] == 1
    assert body["window_seconds"] == 5
    assert set(body["series"][0]) == {
        "t",
        "requests",
        "errors",
        "requests_buffered",
        "slots_processing",
        "slots_total",
    }


async def test_the_sampler_samples_at_once_and_stops_on_shutdown(
    pool: AgentControllerPool,
) -> None:
    """``run`` takes a sample when it starts and returns as soon as shutdown is set."""
    clock = Clock()
    history = StatsHistory(
        FleetView(pool), RequestBuffer(pool, size=1, timeout=1), window=5, clock=clock
    )
    join(
        pool,
        "a",
        Address("http", "127.0.0.1", 1),
        Status(state=LlamaCppState.OK, slots_idle=3, slots_processing=0),
    )
    shutdown = asyncio.Event()
    task = asyncio.create_task(history.run(shutdown))
    await asyncio.sleep(0)
    shutdown.set()
    async with asyncio.timeout(1):
        await task
    clock.now += 1
    assert history.series()[0]["slots_total"] == 3
