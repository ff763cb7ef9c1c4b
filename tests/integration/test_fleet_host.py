"""Workers' fleets (``--workers``): one host's pool and buffer, asked over a real Unix socket.

Each test runs a ``FleetHost`` and several ``RemoteFleet`` links in one event loop: the wire,
the reservations and their release are the real ones; only the processes are not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_host import FleetHost
from paddler.balancer.fleet.remote_fleet import RemoteFleet
from paddler.balancer.fleet.request_buffer import BufferFull, RequestBuffer, ShuttingDown
from paddler.balancer.observability.forwarded_metrics import MetricsForwarder
from paddler.balancer.observability.observers import Observer, Observers, Outcome, RequestRecord
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.balancer import wait_until
from tests.support.pool import join


def status(idle: int, processing: int = 0, models: tuple[str, ...] = ()) -> Status:
    return Status(
        state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing, models=models
    )


class Finished(Observer):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.unauthorized_paths: list[str] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.records.append(record)

    def unauthorized(self, path: str) -> None:
        self.unauthorized_paths.append(path)


@dataclass
class Host:
    pool: AgentControllerPool
    buffer: RequestBuffer
    host: FleetHost
    finished: Finished
    path: Path

    async def link(self, index: int) -> RemoteFleet:
        return await RemoteFleet.connect(self.path, self.buffer.timeout, index)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Host]:
    pool = AgentControllerPool()
    buffer = RequestBuffer(pool, size=10, timeout=5)
    finished = Finished()
    path = tmp_path / "fleet.sock"
    host = FleetHost(pool, buffer, pool.policy, Observers([finished]), path, workers=2)
    await host.start()
    try:
        yield Host(pool, buffer, host, finished, path)
    finally:
        buffer.close()
        host.close()


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_two_workers_share_one_agents_slots_exactly(fleet: Host) -> None:
    """Two workers' reservations count against the same slots: a third request waits until
    one of the other worker's requests ends, and then gets that slot."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=2))
    one, two = await fleet.link(1), await fleet.link(2)
    first = await one.acquire(Demand(True), deadline())
    second = await two.acquire(Demand(True), deadline())
    assert (first.agent.id, second.agent.id) == (agent.id, agent.id)
    assert agent.reserved == 2
    third = asyncio.create_task(one.acquire(Demand(True), deadline()))
    await wait_until(lambda: fleet.buffer.waiting == 1)
    assert not third.done()
    second.release()
    guard = await asyncio.wait_for(third, 5)
    assert guard.agent.name == "a"
    assert agent.reserved == 2
    first.release()
    guard.release()
    await wait_until(lambda: agent.reserved == 0 and agent.in_flight == 0)


async def test_a_worker_that_goes_away_releases_its_slots_and_its_waiters(fleet: Host) -> None:
    """A worker's link closing (a crash) releases every reservation it held, as a client
    disconnect does (settling), and drops its requests from the buffer."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=1))
    doomed = await fleet.link(1)
    await doomed.acquire(Demand(True), deadline())
    waiting = asyncio.create_task(doomed.acquire(Demand(True), deadline()))
    await wait_until(lambda: fleet.buffer.waiting == 1)
    doomed.disconnect()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiting, 5)
    await wait_until(lambda: agent.reserved == 0 and fleet.buffer.waiting == 0)
    assert agent.in_flight == 0
    assert len(agent.settling) == 1  # llama.cpp notices the closed connection a little later
    assert fleet.host.links == 0


async def test_a_request_that_leaves_while_it_waits_is_taken_out_of_the_buffer(
    fleet: Host,
) -> None:
    """Cancelling a worker's wait (its client left) removes the waiter in the host; the next
    slot then goes to whoever waits after it."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=1))
    one = await fleet.link(1)
    held = await one.acquire(Demand(True), deadline())
    leaving = asyncio.create_task(one.acquire(Demand(True), deadline()))
    await wait_until(lambda: fleet.buffer.waiting == 1)
    staying = asyncio.create_task(one.acquire(Demand(True), deadline()))
    await wait_until(lambda: fleet.buffer.waiting == 2)
    leaving.cancel()
    await wait_until(lambda: fleet.buffer.waiting == 1)
    held.release()
    guard = await asyncio.wait_for(staying, 5)
    assert agent.reserved == 1
    guard.release()
    await wait_until(lambda: agent.reserved == 0)


async def test_rejections_reach_the_worker_as_the_buffer_raised_them(fleet: Host) -> None:
    """A full buffer, an unknown model and a closing balancer come back as their own kinds,
    with the host's message."""
    small = RequestBuffer(fleet.pool, size=0, timeout=5)
    fleet.host._buffer = small  # a buffer that holds nobody
    join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=0, models=("m1",)))
    join(fleet.pool, "b", Address("http", "127.0.0.1", 2), status(idle=0, models=("m2",)))
    one = await fleet.link(1)
    with pytest.raises(BufferFull, match="request buffer is full"):
        await one.acquire(Demand(True), deadline())
    assert not one.accepts("m3")
    assert one.accepts("m1")
    assert one.model_ids() == ["m1", "m2"]
    small.close()
    with pytest.raises(ShuttingDown):
        await one.acquire(Demand(True), deadline())


async def test_the_fleets_names_follow_the_agents(fleet: Host) -> None:
    """When an agent with another model joins, the workers' ``accepts`` changes with it, with
    no round trip per request."""
    one = await fleet.link(1)
    join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=1, models=("m1",)))
    await wait_until(lambda: one.model_ids() == ["m1"])
    assert one.accepts("anything")  # a one-model fleet takes every name
    join(fleet.pool, "b", Address("http", "127.0.0.1", 2), status(idle=1, models=("m2",)))
    await wait_until(lambda: one.model_ids() == ["m1", "m2"])
    assert not one.accepts("anything")
    assert one.accepts("m2")


async def test_an_abort_reaches_the_worker_that_holds_the_reservation(fleet: Host) -> None:
    """An agent reporting its llama.cpp unreachable aborts the requests there, in whichever
    worker they run."""
    agent, session = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=1))
    one = await fleet.link(1)
    guard = await one.acquire(Demand(True), deadline())
    reasons: list[str] = []
    guard.on_abort(reasons.append)
    fleet.pool.report(agent, session, Status(state=LlamaCppState.UNREACHABLE, error="gone"))
    await wait_until(lambda: bool(reasons))
    assert len(reasons) == 1
    guard.release()


async def test_health_listing_and_the_retry_question_are_answered_by_the_host(
    fleet: Host,
) -> None:
    """``/health``'s figures, ``/v1/models`` and whether another server could be tried are the
    host's, asked over the link."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=3))
    one = await fleet.link(1)
    guard = await one.acquire(Demand(True), deadline())
    health = await one.health()
    assert (health.usable_agents, health.slots_idle, health.slots_processing) == (1, 2, 1)
    listing = await one.model_listing()
    assert listing == []
    assert not await one.has_candidates([agent.id], None, None)
    assert await one.has_candidates([], None, None)
    guard.release()


async def test_what_servers_did_is_counted_in_the_host(fleet: Host) -> None:
    """Trips, failures and cache reports a worker sends change the host's pool and policy."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=2))
    one = await fleet.link(1)
    guard = await one.acquire(Demand.of(True, None, "hello " * 400), deadline())
    one.learn(
        guard, Demand(True), CacheReport(cached_tokens=0, computed_tokens=500, prompt_seconds=1)
    )
    await wait_until(lambda: agent.prefill_rate is not None)
    one.trip(guard.agent, "broke mid-response")
    await wait_until(lambda: agent.circuit_open)
    guard.release()


async def test_a_workers_requests_are_counted_by_the_hosts_observers(fleet: Host) -> None:
    """A request summary from a worker is replayed into the host's observers with its route,
    status, outcome and times."""
    one = await fleet.link(1)
    forwarder = MetricsForwarder(one.send)
    record = RequestRecord(
        id="r", method="POST", path="/completion", route="/completion", needs_slot=True
    )
    forwarder.buffer_wait_started(record)
    record.status, record.outcome = 200, Outcome.COMPLETED
    record.first_chunk_at = record.started + 0.25
    record.ended = record.started + 1.5
    forwarder.request_finished(record)
    forwarder.unauthorized("/v1/models")
    await wait_until(lambda: bool(fleet.finished.records and fleet.finished.unauthorized_paths))
    counted = fleet.finished.records[0]
    assert (counted.route, counted.status, counted.outcome) == (
        "/completion",
        200,
        Outcome.COMPLETED,
    )
    assert counted.time_to_first_chunk == pytest.approx(0.25)
    assert counted.duration == pytest.approx(1.5)
    assert fleet.finished.unauthorized_paths == ["/v1/models"]


async def test_a_malformed_message_closes_only_that_workers_link(fleet: Host) -> None:
    """The host closes a link that sends what does not parse, releasing what it held, and
    serves the other workers on."""
    agent, _ = join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=2))
    bad, good = await fleet.link(1), await fleet.link(2)
    await bad.acquire(Demand(True), deadline())
    assert bad.transport is not None
    bad.transport.write(b"{not json\n")
    await asyncio.wait_for(bad.closed, 5)
    await wait_until(lambda: agent.reserved == 0)
    guard = await good.acquire(Demand(True), deadline())
    guard.release()


async def test_waiters_from_different_workers_leave_in_arrival_order(fleet: Host) -> None:
    """One buffer orders every worker's waiters: as the one slot frees up again and again, it
    goes to the oldest waiter, whichever worker sent it."""
    join(fleet.pool, "a", Address("http", "127.0.0.1", 1), status(idle=1))
    one, two = await fleet.link(1), await fleet.link(2)
    held = await one.acquire(Demand(True), deadline())
    order: list[str] = []

    async def wait(name: str, link: RemoteFleet) -> None:
        guard = await link.acquire(Demand(True), deadline())
        order.append(name)
        await asyncio.sleep(0)
        guard.release()

    waiters = []
    for number, link in enumerate([one, two, one, two, two, one]):
        waiters.append(asyncio.create_task(wait(f"w{number}", link)))
        await wait_until(lambda count=number + 1: fleet.buffer.waiting == count)
    held.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert order == [f"w{number}" for number in range(6)]
