"""The fleet view: shared, sliced and budgeted readings of a pool in memory."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.balancer.fleet.agent_controller import AgentSnapshot
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_view import FleetReading, FleetView, PerReading
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.management.agents_route import AgentsRoute
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.balancer import ok
from tests.support.pool import join


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(agents: int) -> AgentControllerPool:
    pool = AgentControllerPool()
    for number in range(agents):
        join(
            pool,
            f"a{number}",
            Address("http", f"10.0.{number // 250}.{number % 250 + 1}", 80),
            ok(3, 1),
        )
    return pool


def ageless(snapshot: AgentSnapshot) -> AgentSnapshot:
    return replace(snapshot, last_report_age=0.0)


def reused_for_ever(pool: AgentControllerPool, clock: Clock) -> FleetView:
    """A view whose readings, however cheap, are reused until the clock jumps far ahead."""
    return FleetView(pool, budget=1e-12, fresh_below=0.0, clock=clock)


async def test_the_totals_are_those_the_pool_counts() -> None:
    """Slots and usable agents add up as in the pool's snapshot: usable agents only."""
    pool = fleet(3)
    join(
        pool,
        "broken",
        Address("http", "10.1.0.1", 80),
        Status(state=LlamaCppState.ERROR, slots_idle=5),
    )
    tripped, _ = join(pool, "tripped", Address("http", "10.1.0.2", 80), ok(idle=2))
    pool.trip(tripped, "refused")
    reading = await FleetView(pool).latest()
    snapshot = pool.snapshot()
    assert len(reading.agents) == len(snapshot.agents) == 5
    assert (reading.slots_idle, reading.slots_processing, reading.usable_agents) == (
        snapshot.slots_idle,
        snapshot.slots_processing,
        snapshot.usable_agents,
    )
    assert [ageless(agent.snapshot) for agent in reading.agents] == [
        ageless(agent) for agent in snapshot.agents
    ]
    assert [agent.usable for agent in reading.agents] == [True, True, True, False, False]


async def test_a_small_fleet_is_read_afresh_for_every_reader() -> None:
    """A reading that costs next to nothing is never reused: a report shows at once."""
    pool = AgentControllerPool()
    view = FleetView(pool)
    agent, session = join(pool, "a", Address("http", "10.0.0.1", 80), ok(idle=2))
    first = await view.latest()
    pool.report(agent, session, ok(idle=0, processing=2))
    second = await view.latest()
    assert second is not first
    assert (second.slots_idle, second.slots_processing) == (0, 2)


async def test_a_costly_reading_is_reused_until_its_budget_allows_another() -> None:
    """Within its budget the same reading is handed out; once the clock passes it, a new one."""
    pool = fleet(2)
    clock = Clock()
    view = reused_for_ever(pool, clock)
    first = await view.latest()
    join(pool, "late", Address("http", "10.9.0.1", 80), ok(idle=1))
    assert await view.latest() is first
    clock.now += 1e9
    second = await view.latest()
    assert second is not first
    assert len(second.agents) == 3


async def test_readers_that_ask_during_a_reading_share_it() -> None:
    """A reading is taken in slices; readers asking meanwhile get that same reading."""
    pool = fleet(200)
    view = FleetView(pool)
    readers = [asyncio.create_task(view.latest()) for _ in range(5)]
    readings = await asyncio.gather(*readers)
    assert all(reading is readings[0] for reading in readings)
    assert len(readings[0].agents) == 200


async def test_an_agent_removed_during_a_reading_is_left_out() -> None:
    """The reading lets requests run between slices; an agent that left meanwhile is not in it."""
    pool = fleet(200)
    leaving = pool.agents()[-1]
    taking = asyncio.create_task(FleetView(pool).latest())
    await asyncio.sleep(0)  # the first slice is read
    assert pool.remove(leaving, leaving.session_id, "deregistered")
    reading = await taking
    assert len(reading.agents) == 199
    assert leaving.url not in {agent.snapshot.url for agent in reading.agents}
    assert reading.slots_total == 199 * 4


async def test_a_reader_cancelled_while_reading_leaves_the_others_served() -> None:
    """If the reader taking a reading goes away, one of those waiting for it takes it."""
    pool = fleet(200)
    view = FleetView(pool)
    first = asyncio.create_task(view.latest())
    await asyncio.sleep(0)
    second = asyncio.create_task(view.latest())
    await asyncio.sleep(0)
    first.cancel()
    reading = await second
    assert first.cancelled()
    assert len(reading.agents) == 200


async def test_what_is_made_of_a_reading_is_made_once_per_reading() -> None:
    """However many ask at once, each reading is encoded once; a new reading is encoded anew."""
    pool = fleet(2)
    clock = Clock()
    view = reused_for_ever(pool, clock)
    made: list[FleetReading] = []

    async def make(reading: FleetReading) -> int:
        made.append(reading)
        await asyncio.sleep(0)
        return len(reading.agents)

    encoded = PerReading(view, make)
    results = await asyncio.gather(*(encoded.get() for _ in range(4)))
    assert len(made) == 1
    assert {value for _, value in results} == {2}
    clock.now += 1e9
    await encoded.get()
    assert len(made) == 2


async def test_the_agents_body_is_shared_but_the_buffer_is_read_per_answer() -> None:
    """``/api/v1/agents`` serves the reading's agents and totals, and the buffer as it is now."""
    pool = fleet(2)
    clock = Clock()
    buffer = RequestBuffer(pool, size=4, timeout=1.0)
    route = AgentsRoute(reused_for_ever(pool, clock), buffer)
    request = make_mocked_request("GET", "/api/v1/agents")
    body = json.loads((await route.handle(request)).body)  # type: ignore[arg-type]
    assert [agent["name"] for agent in body["agents"]] == ["a0", "a1"]
    assert (body["slots_idle"], body["slots_processing"], body["requests_buffered"]) == (6, 2, 0)
    assert set(body["agents"][0]) == {
        "id",
        "name",
        "url",
        "state",
        "error",
        "models",
        "slots_total",
        "slots_idle",
        "slots_processing",
        "slots_reported_processing",
        "requests_in_flight",
        "circuit_open",
        "last_report_at",
        "last_report_age_seconds",
        "registered_at",
        "verified",
        "verification",
    }


async def test_the_totals_alone_are_counted_without_a_reading() -> None:
    """Readers of the totals get the pool's sums, and no reading is taken for them."""
    pool = fleet(3)
    join(pool, "loading", Address("http", "10.1.0.1", 80), Status(state=LlamaCppState.LOADING))
    view = FleetView(pool)
    totals = await view.totals()
    snapshot = pool.snapshot()
    assert (totals.slots_idle, totals.slots_processing, totals.usable_agents) == (
        snapshot.slots_idle,
        snapshot.slots_processing,
        snapshot.usable_agents,
    )
    assert view._reading is None


async def test_the_totals_are_live_while_a_reading_is_reused() -> None:
    """The totals are the pool's own, kept as agents change: an agent that joins while a reading
    is reused counts in them at once (it shows in the agents of the next reading)."""
    pool = fleet(2)
    clock = Clock()
    view = reused_for_ever(pool, clock)
    reading = await view.latest()
    join(pool, "late", Address("http", "10.9.0.1", 80), ok(idle=1))
    totals = await view.totals()
    assert totals.usable_agents == reading.usable_agents + 1
    assert totals.slots_idle == reading.slots_idle + 1
    assert await view.latest() is reading


agent_states = st.lists(
    st.tuples(
        st.sampled_from(list(LlamaCppState)),
        st.integers(0, 8),  # idle
        st.integers(0, 8),  # processing
        st.integers(0, 10),  # slot bound
        st.integers(0, 6),  # our reservations
        st.booleans(),  # circuit open
        st.booleans(),  # verified
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(agent_states)
async def test_readings_and_totals_count_as_the_pool_does(
    agents: list[tuple[LlamaCppState, int, int, int, int, bool, bool]],
) -> None:
    """Whatever the states, bounds, reservations and circuits, both add up as the pool's snapshot."""
    pool = AgentControllerPool()
    for number, (state, idle, processing, bound, reserved, tripped, verified) in enumerate(agents):
        status = Status(state=state, slots_idle=idle, slots_processing=processing)
        address = Address("http", f"10.0.0.{number + 1}", 80)
        if verified:
            agent, _ = join(pool, f"a{number}", address, status, slot_bound=bound)
        else:
            agent, _ = pool.register(f"a{number}", address, status)
        for _ in range(reserved):
            pool.reserve(agent, Demand(True))
        if tripped:
            pool.trip(agent, "refused")
    usable = [agent for agent in pool.agents() if agent.usable()]
    expected = (
        sum(agent.free_slots() for agent in usable),
        sum(min(agent.busy_slots(), agent.slots_total) for agent in usable),
        len(usable),
    )
    reading = await FleetView(pool).latest()
    totals = await FleetView(pool).totals()
    assert (reading.slots_idle, reading.slots_processing, reading.usable_agents) == expected
    assert (totals.slots_idle, totals.slots_processing, totals.usable_agents) == expected
