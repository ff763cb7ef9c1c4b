"""Two replicas' ``RedisFleet`` on one real Redis: what the proxy of each sees is one fleet, with
every slot counted once and the waiting requests served in their fleet-wide turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from paddler.balancer import errors
from paddler.balancer.fleet.redis_fleet import RedisFleet, StateUnreachable
from paddler.balancer.fleet.redis_leases import RedisLeases
from paddler.balancer.fleet.redis_registry import AgentRecord, RedisRegistry
from paddler.balancer.fleet.request_buffer import BufferTimeout, NoCandidates, ShuttingDown
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.policies import Demand
from tests.support.redis_server import RedisServer, running_redis

SERVER = AgentRecord(
    id="gpu-1@10.0.0.7:8088",
    name="gpu-1",
    scheme="http",
    host="10.0.0.7",
    port=8088,
    models=("qwen",),
    slots_total=2,
    state="ok",
    error=None,
    verified=True,
    owner="",
)
OTHER = replace(SERVER, id="gpu-2@10.0.0.8:8088", name="gpu-2", host="10.0.0.8")
GENERATION = Demand(needs_slot=True, model="qwen")


class Owner:
    """The balancer the agents report to: writes their records and reports."""

    def __init__(self, client: Redis) -> None:
        self.registry = RedisRegistry(client, "fleet", replica="owner", stale_after=30.0)
        self.leases = RedisLeases(client, "fleet", replica="owner")

    async def serve(self, record: AgentRecord, processing: int = 0) -> None:
        await self.registry.put(record)
        await self.leases.report(
            record.id,
            slots_total=record.slots_total,
            slots_processing=processing,
            usable=record.state == "ok",
            models=record.models,
        )


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


@pytest.fixture
async def owner(redis_server: RedisServer) -> AsyncIterator[Owner]:
    client = Redis.from_url(redis_server.url)
    try:
        yield Owner(client)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def replica(
    server: RedisServer, name: str, *, lease_timeout: float = 10.0, buffer_timeout: float = 10.0
) -> AsyncIterator[RedisFleet]:
    """A replica's fleet, running, once it has read the membership."""
    client = Redis.from_url(server.url)
    fleet = RedisFleet(
        client,
        fleet="fleet",
        replica=name,
        buffer_timeout=buffer_timeout,
        stale_after=30.0,
        lease_timeout=lease_timeout,
    )
    shutdown = asyncio.Event()
    running = asyncio.create_task(fleet.run(shutdown))
    try:
        async with asyncio.timeout(5):
            await fleet.followed.wait()
        yield fleet
    finally:
        fleet.close()
        shutdown.set()
        await running
        await client.aclose()


async def until(condition: object, timeout: float = 5.0) -> None:
    """Until ``condition()`` holds (a membership change reaches a replica within ms)."""
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_both_replicas_see_the_servers_the_owner_writes(
    redis_server: RedisServer, owner: Owner
) -> None:
    """A replica that runs before a server joins and one that starts after both see it, its
    model and its slots; /health is the same from both."""
    async with replica(redis_server, "a") as a:
        await owner.serve(SERVER)
        await until(lambda: a.accepts("qwen") and a.model_ids() == ["qwen"])
        async with replica(redis_server, "b") as b:
            assert b.model_ids() == ["qwen"]
            assert await a.health() == await b.health() == (1, 2, 0, 0)


async def test_a_slot_is_never_given_twice_whichever_replica_asks(
    redis_server: RedisServer, owner: Owner
) -> None:
    """Ten requests at once through two replicas for 2 + 2 slots: four get one at once, spread
    over both servers, the others wait; every later one gets the slot a release frees."""
    await owner.serve(SERVER)
    await owner.serve(OTHER)
    async with replica(redis_server, "a") as a, replica(redis_server, "b") as b:
        await until(lambda: len(a._candidates("qwen", ())) == len(b._candidates("qwen", ())) == 2)
        waits = [
            asyncio.create_task((a, b)[n % 2].acquire(GENERATION, deadline())) for n in range(10)
        ]
        await until(lambda: sum(task.done() for task in waits) == 4)
        held = [task.result() for task in waits if task.done()]
        assert sorted(guard.agent.id for guard in held).count(SERVER.id) == 2
        for served in range(5, 11):
            held.pop(0).release()
            await until(lambda: sum(task.done() for task in waits) == served)  # noqa: B023
            held = [task.result() for task in waits if task.done()]
            held = [guard for guard in held if not guard.released]
            assert len(held) == 4
            assert (await b.health()).slots_idle == 0
        for guard in held:
            guard.release()
        await until(lambda: not a._releases and not b._releases)
        assert (await a.health()).slots_idle == 4


async def test_waiting_requests_are_served_in_the_order_they_arrived_at_either_replica(
    redis_server: RedisServer, owner: Owner
) -> None:
    """One slot, and requests that arrive in turn at two replicas: each release serves the
    oldest waiter, wherever it waits."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "a") as a, replica(redis_server, "b") as b:
        await until(lambda: a.accepts("qwen") and b.accepts("qwen"))
        first = await a.acquire(GENERATION, deadline())
        waits = []
        for number in range(6):
            waits.append(asyncio.create_task((a, b)[number % 2].acquire(GENERATION, deadline())))
            async with asyncio.timeout(5):  # each waits in Redis before the next arrives
                while True:
                    if await owner.leases.waiting() == number + 1:
                        break
                    await asyncio.sleep(0.01)
        served = []
        guard: SlotGuard = first
        for _ in range(6):
            guard.release()
            done, _ = await asyncio.wait(
                [task for task in waits if not task.done()],
                timeout=5,
                return_when=asyncio.FIRST_COMPLETED,
            )
            (task,) = done
            served.append(waits.index(task))
            guard = task.result()
        guard.release()
        assert served == [0, 1, 2, 3, 4, 5]


async def test_a_request_that_waits_too_long_is_refused_and_leaves_the_queue(
    redis_server: RedisServer, owner: Owner
) -> None:
    """The buffer's deadline refuses it (BufferTimeout) and nothing of it is left waiting."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "a") as a:
        await until(lambda: a.accepts("qwen"))
        held = await a.acquire(GENERATION, deadline())
        with pytest.raises(BufferTimeout):
            await a.acquire(GENERATION, deadline(0.2))
        assert (await a.health()).requests_buffered == 0
        held.release()


async def test_a_request_whose_client_left_gives_its_turn_to_the_next(
    redis_server: RedisServer, owner: Owner
) -> None:
    """A waiting request cancelled (its client went away) leaves the queue: the next release
    serves the one behind it."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "a") as a, replica(redis_server, "b") as b:
        await until(lambda: a.accepts("qwen") and b.accepts("qwen"))
        held = await a.acquire(GENERATION, deadline())
        gone = asyncio.create_task(a.acquire(GENERATION, deadline()))
        await until(lambda: bool(a._waiting))
        behind = asyncio.create_task(b.acquire(GENERATION, deadline()))
        await until(lambda: bool(b._waiting))
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        await until(lambda: not a._releases)
        held.release()
        async with asyncio.timeout(5):
            guard = await behind
        guard.release()


async def test_a_long_request_keeps_its_slot_past_the_lease_timeout(
    redis_server: RedisServer, owner: Owner
) -> None:
    """Its replica renews the lease while the request runs: the other replica cannot take the
    slot after the first timeout, and gets it once the request ends."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with (
        replica(redis_server, "a", lease_timeout=0.3) as a,
        replica(redis_server, "b", lease_timeout=0.3) as b,
    ):
        await until(lambda: a.accepts("qwen") and b.accepts("qwen"))
        held = await a.acquire(GENERATION, deadline())
        with pytest.raises(BufferTimeout):
            await b.acquire(GENERATION, deadline(0.9))
        held.release()
        async with asyncio.timeout(5):
            (await b.acquire(GENERATION, deadline())).release()


async def test_a_dead_replicas_slots_come_back_within_the_lease_timeout(
    redis_server: RedisServer, owner: Owner
) -> None:
    """A replica that stops (its requests' leases no longer renewed) holds nothing after the
    lease timeout: a request waiting at the other one gets the slot with the server's next
    report (a report gives freed slots to the waiters)."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "b", lease_timeout=0.3) as b:
        async with replica(redis_server, "a", lease_timeout=0.3) as a:
            await until(lambda: a.accepts("qwen") and b.accepts("qwen"))
            await a.acquire(GENERATION, deadline())  # never released: the replica dies
            a._held.clear()  # as kill -9 would: nothing renews or releases it
            waiting = asyncio.create_task(b.acquire(GENERATION, deadline()))
            async with asyncio.timeout(5):  # queued in Redis while the lease still holds
                while True:
                    if await owner.leases.waiting() == 1:
                        break
                    await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # the lease timeout itself is what is tested
        assert not waiting.done()
        await owner.serve(replace(SERVER, slots_total=1), processing=0)
        async with asyncio.timeout(5):
            (await waiting).release()


async def test_requests_that_need_no_slot_go_to_a_server_without_a_lease(
    redis_server: RedisServer, owner: Owner
) -> None:
    """``GET /props`` and the like: a server of the model, nothing reserved; once every
    server was tried, NoCandidates."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "a") as a:
        await until(lambda: a.accepts("qwen"))
        guard = await a.acquire(Demand(needs_slot=False, model="qwen"), deadline())
        assert guard.holds_slot is False and guard.agent.id == SERVER.id
        guard.release()
        assert (await a.health()).slots_idle == 1
        tried = Demand(needs_slot=True, model="qwen", exclude=frozenset({SERVER.id}))
        with pytest.raises(NoCandidates):
            await a.acquire(tried, deadline())


async def test_stopping_answers_the_waiting_requests_and_empties_the_queue(
    redis_server: RedisServer, owner: Owner
) -> None:
    """close(): a waiting request hears ShuttingDown, and its ticket leaves the queue."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "b") as b, replica(redis_server, "a") as a:
        await until(lambda: a.accepts("qwen"))
        held = await a.acquire(GENERATION, deadline())
        waiting = asyncio.create_task(a.acquire(GENERATION, deadline()))
        await until(lambda: bool(a._waiting))
        a.close()
        with pytest.raises(ShuttingDown):
            await waiting
        await until(lambda: not a._releases)
        assert (await b.health()).requests_buffered == 0
        held.release()


async def test_a_request_waiting_when_redis_restarts_empty_is_queued_again_and_served(
    redis_server: RedisServer, owner: Owner
) -> None:
    """Redis forgets the queue: the replica, once its channel is back, queues its waiter again,
    and the owner's next report (it writes its agents again) gives it the slot."""
    await owner.serve(replace(SERVER, slots_total=1))
    async with replica(redis_server, "a") as a:
        await until(lambda: a.accepts("qwen"))
        held = await a.acquire(GENERATION, deadline())
        waiting = asyncio.create_task(a.acquire(GENERATION, deadline(30)))
        await until(lambda: bool(a._queued))
        await redis_server.restart()
        async with asyncio.timeout(15):
            while not waiting.done():
                with contextlib.suppress(RedisError, OSError):
                    await owner.serve(replace(SERVER, slots_total=1))
                await asyncio.sleep(0.2)
        guard = waiting.result()
        assert guard.agent.id == SERVER.id
        guard.release()
        held.release()


async def test_without_redis_a_request_gets_a_503_and_health_counts_nothing(
    redis_server: RedisServer, owner: Owner
) -> None:
    """Redis gone: a reservation is refused as unreachable (the proxy answers 503, Retry-After)
    rather than given a slot nobody counts, and /health's figures are all 0 (a 503, out of the
    load balancer's rotation)."""
    await owner.serve(SERVER)
    async with replica(redis_server, "a") as a:
        await until(lambda: a.accepts("qwen"))
        await redis_server.stop()
        with pytest.raises(StateUnreachable) as refused:
            await a.acquire(GENERATION, deadline())
        assert errors.from_buffer(refused.value).status == 503
        assert await a.health() == (0, 0, 0, 0)
        await redis_server.start()
