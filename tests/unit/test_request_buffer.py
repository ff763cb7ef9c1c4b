"""Buffered requests: FIFO order, the size limit, the timeout, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import random

import pytest

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.request_buffer import (
    BufferFull,
    BufferTimeout,
    NoCandidates,
    RequestBuffer,
    ShuttingDown,
)
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join


def status(idle: int, processing: int = 0) -> Status:
    return Status(state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing)


def address(port: int) -> Address:
    return Address("http", "127.0.0.1", port)


@pytest.fixture
def pool() -> AgentControllerPool:
    return AgentControllerPool()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_free_slot_is_granted_without_waiting(pool: AgentControllerPool) -> None:
    """With a free slot and nobody waiting, acquire returns at once."""
    join(pool, "a", address(1), status(idle=1))
    buffer = RequestBuffer(pool, size=0, timeout=1)
    guard = await buffer.acquire(Demand(True))
    assert guard.agent.name == "a"
    assert buffer.waiting == 0


async def test_waiters_are_served_in_arrival_order(pool: AgentControllerPool) -> None:
    """When slots free up one by one, buffered requests get them first come, first served."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    buffer = RequestBuffer(pool, size=10, timeout=5)
    holder = await buffer.acquire(Demand(True))
    served: list[int] = []

    async def request(number: int) -> None:
        with await buffer.acquire(Demand(True)):
            served.append(number)
            await asyncio.sleep(0)

    tasks = []
    for number in range(5):
        tasks.append(asyncio.create_task(request(number)))
        await settle()
    assert buffer.waiting == 5
    holder.release()
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3, 4]
    assert agent.reserved == 0


async def test_a_newcomer_does_not_overtake_a_waiter(pool: AgentControllerPool) -> None:
    """A slot freed while someone waits goes to the waiter, not to a later arrival."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    buffer = RequestBuffer(pool, size=10, timeout=5)
    holder = await buffer.acquire(Demand(True))
    waiter = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    holder.release()
    newcomer = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    assert waiter.done()
    assert not newcomer.done()
    waiter.result().release()
    (await newcomer).release()
    assert agent.reserved == 0


async def test_a_full_buffer_rejects_at_once(pool: AgentControllerPool) -> None:
    """Beyond the size limit a request is refused immediately."""
    join(pool, "a", address(1), status(idle=0, processing=1))
    buffer = RequestBuffer(pool, size=2, timeout=5)
    waiters = [asyncio.create_task(buffer.acquire(Demand(True))) for _ in range(2)]
    await settle()
    with pytest.raises(BufferFull):
        await buffer.acquire(Demand(True))
    assert buffer.waiting == 2
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert buffer.waiting == 0


async def test_a_zero_size_buffer_refuses_when_no_slot_is_free(pool: AgentControllerPool) -> None:
    """--request-buffer-size 0 means no buffering at all."""
    buffer = RequestBuffer(pool, size=0, timeout=5)
    with pytest.raises(BufferFull):
        await buffer.acquire(Demand(True))


async def test_waiting_ends_with_timeout(pool: AgentControllerPool) -> None:
    """A request that waits longer than the buffer timeout gets BufferTimeout and leaves."""
    buffer = RequestBuffer(pool, size=5, timeout=0.05)
    with pytest.raises(BufferTimeout):
        await buffer.acquire(Demand(True))
    assert buffer.waiting == 0


async def test_requests_wait_for_the_first_agent_to_join(pool: AgentControllerPool) -> None:
    """With no agent at all a request is buffered, and served when an agent registers."""
    buffer = RequestBuffer(pool, size=5, timeout=5)
    waiter = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    assert not waiter.done()
    join(pool, "late", address(1), status(idle=1))
    guard = await waiter
    assert guard.agent.name == "late"


async def test_a_cancelled_waiter_leaves_the_buffer_at_once(pool: AgentControllerPool) -> None:
    """A client that disconnects while buffered is dropped immediately."""
    buffer = RequestBuffer(pool, size=5, timeout=5)
    waiter = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    assert buffer.waiting == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert buffer.waiting == 0


async def test_a_slot_handed_to_a_cancelled_waiter_goes_back(pool: AgentControllerPool) -> None:
    """If a waiter is cancelled just after being handed a slot, the slot is released."""
    buffer = RequestBuffer(pool, size=5, timeout=5)
    waiter = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    agent, _ = join(pool, "a", address(1), status(idle=1))  # hands the slot over...
    waiter.cancel()  # ...and the client leaves before the waiter runs again
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert agent.reserved == 0
    assert agent.in_flight == 0


async def test_closing_fails_every_waiter_with_shutting_down(pool: AgentControllerPool) -> None:
    """On shutdown buffered requests are answered, and new ones refused."""
    buffer = RequestBuffer(pool, size=5, timeout=5)
    waiters = [asyncio.create_task(buffer.acquire(Demand(True))) for _ in range(3)]
    await settle()
    buffer.close()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, ShuttingDown) for result in results)
    with pytest.raises(ShuttingDown):
        await buffer.acquire(Demand(True))


async def test_an_unservable_waiter_does_not_block_the_queue(pool: AgentControllerPool) -> None:
    """A retry that excludes the only free agent does not hold up requests behind it."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    join(pool, "b", address(2), status(idle=0, processing=1))
    buffer = RequestBuffer(pool, size=5, timeout=5)
    holder = await buffer.acquire(Demand(True))
    retry = asyncio.create_task(buffer.acquire(Demand(True, exclude=frozenset({agent.id}))))
    fresh = asyncio.create_task(buffer.acquire(Demand(True)))
    await settle()
    holder.release()
    await settle()
    assert fresh.done()
    assert not retry.done()
    retry.cancel()
    await asyncio.gather(retry, return_exceptions=True)
    fresh.result().release()


async def test_excluding_every_agent_fails_fast(pool: AgentControllerPool) -> None:
    """A retry with no other agent registered gets NoCandidates instead of waiting."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    buffer = RequestBuffer(pool, size=5, timeout=5)
    with pytest.raises(NoCandidates):
        await buffer.acquire(Demand(True, exclude=frozenset({agent.id})))


async def test_non_generating_requests_need_no_free_slot(pool: AgentControllerPool) -> None:
    """Requests that take no slot go to a busy agent without waiting and reserve nothing."""
    agent, _ = join(pool, "a", address(1), status(idle=0, processing=2))
    buffer = RequestBuffer(pool, size=0, timeout=5)
    guard: SlotGuard = await buffer.acquire(Demand(False))
    assert guard.agent is agent
    assert agent.reserved == 0
    guard.release()


async def test_many_concurrent_requests_never_oversubscribe(pool: AgentControllerPool) -> None:
    """However many requests race for slots, at most the free slots are held at once."""
    agents = [
        join(pool, name, address(port), status(idle=3))[0] for port, name in ((1, "a"), (2, "b"))
    ]
    buffer = RequestBuffer(pool, size=100, timeout=5)
    peak = 0

    async def request() -> None:
        nonlocal peak
        with await buffer.acquire(Demand(True)) as guard:
            assert guard.agent.reserved <= 3
            peak = max(peak, sum(agent.reserved for agent in agents))
            await asyncio.sleep(0.001)

    await asyncio.gather(*(request() for _ in range(60)))
    assert peak == 6
    assert all(agent.reserved == 0 and agent.in_flight == 0 for agent in agents)


async def test_a_waiter_is_served_at_once_when_the_removal_of_a_server_lets_it_through(
    pool: AgentControllerPool,
) -> None:
    """A request waiting for its model's only server goes to the one left when that one leaves.

    With two models, a request for ``alpha`` may only wait for the ``alpha`` server; once that
    server is gone the fleet serves one model, which takes any name, so the idle ``beta`` server
    must get the request then, not at the next report that happens to free a slot.
    """
    alpha, alpha_session = join(
        pool, "a", address(1), Status(state=LlamaCppState.OK, slots_processing=1, models=("alpha",))
    )
    join(pool, "b", address(2), Status(state=LlamaCppState.OK, slots_idle=1, models=("beta",)))
    buffer = RequestBuffer(pool, size=5, timeout=5)
    waiter = asyncio.create_task(buffer.acquire(Demand(True, model="alpha")))
    await settle()
    assert buffer.waiting == 1
    pool.remove(alpha, alpha_session, "socket closed")
    await settle()
    assert waiter.done(), "the request still waits although the idle server may take it"
    guard = waiter.result()
    assert guard.agent.name == "b"
    guard.release()


class CountedPicks:
    """Counts the pool's picks, which is what each step of the buffer costs."""

    def __init__(self, pool: AgentControllerPool) -> None:
        self.count = 0
        pick = pool.pick

        def counted(demand: Demand, *, spill: bool = True) -> object:
            self.count += 1
            return pick(demand, spill=spill)

        pool.pick = counted  # type: ignore[method-assign,assignment]


async def queue_up(buffer: RequestBuffer, demands: list[Demand]) -> list[asyncio.Task[SlotGuard]]:
    tasks = [asyncio.create_task(buffer.acquire(demand)) for demand in demands]
    await settle()
    return tasks


async def test_arrivals_while_nothing_is_free_cost_no_pick(pool: AgentControllerPool) -> None:
    """With nothing free, a thousand arrivals only join the queue: the first one, which found
    nobody waiting, asks the pool once, and none of the others asks at all."""
    join(pool, "a", address(1), status(idle=0, processing=4))
    buffer = RequestBuffer(pool, size=2000, timeout=30)
    picks = CountedPicks(pool)
    tasks = await queue_up(buffer, [Demand(True) for _ in range(1000)])
    assert buffer.waiting == 1000
    assert picks.count == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert buffer.waiting == 0
    assert picks.count == 1, "leaving the buffer walked it"


async def test_a_freed_slot_wakes_the_oldest_waiter_with_one_pick(
    pool: AgentControllerPool,
) -> None:
    """With a thousand waiting, each freed slot costs one pick (and a check that nothing else
    is free), and goes to the oldest waiter."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    buffer = RequestBuffer(pool, size=2000, timeout=30)
    holder = await buffer.acquire(Demand(True))
    demands = [Demand(True) for _ in range(1000)]
    tasks = await queue_up(buffer, demands)
    picks = CountedPicks(pool)
    served: list[int] = []
    for _ in range(20):
        holder.release()
        await settle()
        finished = [number for number, task in enumerate(tasks) if task.done()]
        new = [number for number in finished if number not in served]
        assert len(new) == 1
        served.extend(new)
        holder = tasks[new[0]].result()
    assert served == list(range(20))
    assert picks.count == 20
    holder.release()
    for task in tasks[20:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert agent.reserved == 0
    assert buffer.waiting == 0


async def test_waiters_of_two_models_leave_each_in_arrival_order(
    pool: AgentControllerPool,
) -> None:
    """Interleaved waiters for two models, freed in random batches by reports, leave each
    model's queue in the order they arrived, and no slot is handed out twice."""
    alpha, alpha_session = join(
        pool, "a", address(1), Status(state=LlamaCppState.OK, slots_processing=4, models=("alpha",))
    )
    beta, beta_session = join(
        pool, "b", address(2), Status(state=LlamaCppState.OK, slots_processing=4, models=("beta",))
    )
    buffer = RequestBuffer(pool, size=500, timeout=30)
    rng = random.Random(10)
    models = [rng.choice(("alpha", "beta")) for _ in range(400)]
    order: list[int] = []

    async def request(number: int, model: str) -> None:
        guard = await buffer.acquire(Demand(True, model=model))
        order.append(number)
        guard.release()

    tasks = [asyncio.create_task(request(n, m)) for n, m in enumerate(models)]
    await settle()
    assert buffer.waiting == 400
    while buffer.waiting:
        for agent, session in ((alpha, alpha_session), (beta, beta_session)):
            free = rng.randint(0, 4)
            pool.report(
                agent,
                session,
                Status(
                    state=LlamaCppState.OK,
                    slots_idle=free,
                    slots_processing=4 - free,
                    models=agent.status.models,
                ),
            )
            pool.report(
                agent,
                session,
                Status(state=LlamaCppState.OK, slots_processing=4, models=agent.status.models),
            )
        await settle()
    await asyncio.gather(*tasks)
    for model in ("alpha", "beta"):
        mine = [number for number in order if models[number] == model]
        assert mine == sorted(mine)
    assert alpha.reserved == beta.reserved == 0
