"""Slot leases in a real Redis (``fleet/redis_leases``): exact across replicas, given back once,
expiring when not renewed, still there after Redis forgets its scripts; and the fleet-wide queue
of waiting requests, served in arrival order whichever replica they came to."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from paddler.balancer.fleet.redis_leases import RedisLeases
from tests.support.redis_server import RedisServer, running_redis


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLeases, RedisLeases]]:
    """Two balancers' views of one fleet, each through a client of its own."""
    first, second = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        yield RedisLeases(first, "fleet", replica="a"), RedisLeases(second, "fleet", replica="b")
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_server_is_never_reserved_beyond_its_slots_whichever_replica_asks(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """200 reservations at once from two replicas on a server with 8 free slots: 8 are taken."""
    a, b = replicas
    assert (await a.report("s1", slots_total=8, slots_processing=0, usable=True)).free == 8
    taken = await asyncio.gather(
        *((a if n % 2 else b).reserve(["s1"], f"lease-{n}") for n in range(200))
    )
    assert sum(agent == "s1" for agent in taken) == 8
    assert await b.slots("s1") == (0, 8)


async def test_a_report_counts_what_is_busy_beyond_the_leases_as_foreign(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """5 processing with 2 leases held: 3 foreign slots, so 3 of 8 are free; a later report
    that sees only our 2 frees the foreign ones."""
    a, b = replicas
    await a.report("s1", slots_total=8, slots_processing=0, usable=True)
    assert await a.reserve(["s1"], "a-1") == "s1"
    assert await b.reserve(["s1"], "b-1") == "s1"
    assert (await a.report("s1", slots_total=8, slots_processing=5, usable=True)).free == 3
    assert await b.slots("s1") == (3, 2)
    assert (await b.report("s1", slots_total=8, slots_processing=2, usable=True)).free == 6


async def test_a_lease_is_given_back_exactly_once(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """The second release of a lease changes nothing, even from the other replica."""
    a, b = replicas
    await a.report("s1", slots_total=2, slots_processing=0, usable=True)
    assert await a.reserve(["s1"], "a-1") == "s1"
    assert await a.reserve(["s1"], "a-2") == "s1"
    assert (await a.release("s1", "a-1")).held is True
    assert (await b.release("s1", "a-1")).held is False
    assert await a.slots("s1") == (1, 1)


async def test_a_slot_released_as_abandoned_stays_busy_until_the_next_report(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """A client that left: its slot settles (busy) until a report shows whether llama.cpp
    still holds it."""
    a, _ = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)
    assert await a.reserve(["s1"], "a-1") == "s1"
    assert (await a.release("s1", "a-1", settle_for=60.0)).held is True
    assert await a.slots("s1") == (0, 0)
    assert await a.reserve(["s1"], "a-2") is None
    assert (await a.report("s1", slots_total=1, slots_processing=0, usable=True)).free == 1
    assert await a.reserve(["s1"], "a-2") == "s1"


async def test_a_settling_slot_is_free_again_once_its_deadline_passes(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """Without a report, a settling slot counts as busy only until its deadline."""
    a, _ = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)
    await a.reserve(["s1"], "a-1")
    await a.release("s1", "a-1", settle_for=0.2)
    assert await a.reserve(["s1"], "a-2") is None
    await asyncio.sleep(0.3)  # the deadline itself is what is tested
    assert await a.reserve(["s1"], "a-2") == "s1"


async def test_a_dead_replicas_leases_expire_and_their_slots_return(
    redis_server: RedisServer,
) -> None:
    """A replica that stops renewing (killed) loses its leases after the lease timeout; the
    other one's renewed lease outlives it."""
    clients = [Redis.from_url(redis_server.url) for _ in range(2)]
    try:
        dead, alive = (RedisLeases(client, "fleet", lease_timeout=0.3) for client in clients)
        await alive.report("s1", slots_total=2, slots_processing=0, usable=True)
        assert await dead.reserve(["s1"], "dead-1") == "s1"
        assert await alive.reserve(["s1"], "alive-1") == "s1"
        assert await alive.reserve(["s1"], "alive-2") is None
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await alive.renew("s1", ["alive-1"]) == 1
        assert await alive.slots("s1") == (1, 1)
        assert await alive.reserve(["s1"], "alive-2") == "s1"
    finally:
        for client in clients:
            await client.aclose()


async def test_an_expired_lease_is_not_brought_back_by_renewing_it(
    redis_server: RedisServer,
) -> None:
    """Its slot may have been given to another request meanwhile."""
    client = Redis.from_url(redis_server.url)
    try:
        leases = RedisLeases(client, "fleet", lease_timeout=0.1)
        await leases.report("s1", slots_total=1, slots_processing=0, usable=True)
        await leases.reserve(["s1"], "late")
        await asyncio.sleep(0.2)
        assert await leases.renew("s1", ["late"]) == 0
        assert await leases.slots("s1") == (1, 0)
    finally:
        await client.aclose()


async def test_candidates_are_tried_in_order_skipping_full_and_unusable_ones(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """The first usable candidate with a free slot is taken; an unknown server has none."""
    a, _ = replicas
    await a.report("full", slots_total=1, slots_processing=1, usable=True)
    await a.report("broken", slots_total=4, slots_processing=0, usable=False)
    await a.report("ok", slots_total=4, slots_processing=0, usable=True)
    assert await a.reserve(["unknown", "full", "broken", "ok"], "a-1") == "ok"
    assert await a.reserve(["unknown", "full", "broken"], "a-2") is None
    assert await a.reserve([], "a-3") is None


async def test_fleets_with_other_names_share_nothing(redis_server: RedisServer) -> None:
    """Two fleets on one Redis: a server's leases in one are not counted in the other."""
    client = Redis.from_url(redis_server.url)
    try:
        one, other = RedisLeases(client, "one"), RedisLeases(client, "other")
        await one.report("s1", slots_total=1, slots_processing=0, usable=True)
        await other.report("s1", slots_total=1, slots_processing=0, usable=True)
        assert await one.reserve(["s1"], "x") == "s1"
        assert await other.reserve(["s1"], "x") == "s1"
    finally:
        await client.aclose()


async def test_the_scripts_work_again_after_redis_restarts_empty(
    redis_server: RedisServer, replicas: tuple[RedisLeases, RedisLeases]
) -> None:
    """A restart forgets the scripts and the data: the next report and reservation go through
    (the scripts are sent again whole), from a fresh count."""
    a, _ = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)
    assert await a.reserve(["s1"], "before") == "s1"
    await redis_server.restart()
    for attempt in range(50):  # the client's connection broke with the server: it reconnects
        try:
            await a.report("s1", slots_total=1, slots_processing=0, usable=True)
            break
        except RedisConnectionError:
            assert attempt < 49
            await asyncio.sleep(0.02)
    assert await a.reserve(["s1"], "after") == "s1"
    assert await a.slots("s1") == (0, 1)


async def test_random_operations_from_two_replicas_agree_with_a_model_of_one_pool(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """2,000 reports, reservations and releases, from either replica, over 3 servers: the free
    slots and leases after each are what one in-process pool would count."""
    rng = random.Random(11)
    total = {"s1": 3, "s2": 5, "s3": 1}
    foreign = dict.fromkeys(total, 0)
    held: dict[str, set[str]] = {name: set() for name in total}
    for name, slots in total.items():
        await replicas[0].report(name, slots_total=slots, slots_processing=0, usable=True)
    for number in range(2000):
        leases = replicas[rng.randrange(2)]
        name = rng.choice(list(total))
        action = rng.random()
        if action < 0.15:
            processing = rng.randrange(total[name] + 2)
            foreign[name] = max(0, processing - len(held[name]))
            await leases.report(
                name, slots_total=total[name], slots_processing=processing, usable=True
            )
        elif action < 0.6:
            order = rng.sample(list(total), k=len(total))
            expected = next(
                (n for n in order if len(held[n]) + foreign[n] < total[n]),
                None,
            )
            lease = f"lease-{number}"
            assert await leases.reserve(order, lease) == expected
            if expected is not None:
                held[expected].add(lease)
        elif held[name]:
            lease = rng.choice(sorted(held[name]))
            held[name].discard(lease)
            assert (await leases.release(name, lease)).held is True
        free, count = await leases.slots(name)
        assert count == len(held[name])
        assert free == max(0, total[name] - len(held[name]) - foreign[name])


async def test_waiting_requests_are_served_in_arrival_order_whichever_replica_they_came_to(
    redis_server: RedisServer, replicas: tuple[RedisLeases, RedisLeases]
) -> None:
    """Four requests wait at two replicas in turn for one slot: each release gives it to the
    oldest, and wakes that one's replica, by an event on its channel."""
    a, b = replicas
    listener = Redis.from_url(redis_server.url)
    channels = listener.pubsub()
    try:
        await channels.subscribe(a.wake_channel, b.wake_channel)
        for _ in range(2):
            await channels.get_message(timeout=1.0)  # the subscriptions' confirmations
        await a.report("s1", slots_total=1, slots_processing=0, usable=True)
        assert await a.reserve(["s1"], "running") == "s1"
        for number, replica in enumerate((a, b, a, b), start=1):
            assert await replica.reserve_or_wait(["s1"], f"t{number}") is None
        served, woken = [], []
        lease = "running"
        for _ in range(4):
            released = await (a if lease in ("running", "t1", "t3") else b).release("s1", lease)
            assert released.held is True
            (lease,) = released.handed
            served.append(lease)
            message = await channels.get_message(ignore_subscribe_messages=True, timeout=2.0)
            assert message is not None
            woken.append((message["channel"].decode(), message["data"].decode()))
        assert served == ["t1", "t2", "t3", "t4"]
        assert woken == [
            (a.wake_channel, "t1 s1"),
            (b.wake_channel, "t2 s1"),
            (a.wake_channel, "t3 s1"),
            (b.wake_channel, "t4 s1"),
        ]
        assert await a.slots("s1") == (0, 1)
    finally:
        await channels.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()


async def test_an_arrival_waits_behind_requests_for_its_model_and_not_behind_others(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """A free slot that no waiter could be given (its server's models were not named) is not
    taken by a new request for a model that has waiters, but is by one for another."""
    a, b = replicas
    await a.report("s1", slots_total=1, slots_processing=1, usable=True)
    assert await a.reserve_or_wait(["s1"], "waiting", model="m") is None
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)  # models not named
    assert await b.reserve(["s1"], "late", model="m") is None
    assert await b.reserve(["s1"], "other", model="n") == "s1"


async def test_a_freed_slot_goes_only_to_requests_its_server_can_serve(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """A server of model m1 gives its slot to the waiter for m1 (or for any model), never to
    the older waiter for m2."""
    a, b = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True, models=["m1"])
    assert await a.reserve(["s1"], "running", model="m1") == "s1"
    assert await a.reserve_or_wait(["s1"], "for-m2", model="m2") is None
    assert await b.reserve_or_wait(["s1"], "for-m1", model="m1") is None
    released = await a.release("s1", "running", models=["m1"])
    assert released.handed == ["for-m1"]


async def test_a_report_that_frees_slots_gives_them_to_the_waiters(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """Slots freed outside the balancers (foreign traffic ending) go to the oldest waiters."""
    a, b = replicas
    await a.report("s1", slots_total=2, slots_processing=2, usable=True)
    for ticket in ("t1", "t2", "t3"):
        assert await b.reserve_or_wait(["s1"], ticket) is None
    reported = await a.report("s1", slots_total=2, slots_processing=0, usable=True)
    assert reported == (0, ["t1", "t2"])


async def test_a_request_that_left_is_not_given_a_slot(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """A waiter that timed out (or whose client left) leaves its queue: the slot goes to the
    next one."""
    a, b = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)
    await a.reserve(["s1"], "running")
    await a.reserve_or_wait(["s1"], "t1")
    await b.reserve_or_wait(["s1"], "t2")
    assert await a.leave("t1") is True
    assert (await a.release("s1", "running")).handed == ["t2"]


async def test_a_waiter_given_a_slot_as_it_left_is_told_so_and_holds_the_lease(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """The hand-off and the leaving crossed: leaving says the ticket was not waiting any more,
    and its lease is held until the caller releases it (no slot is lost)."""
    a, _ = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True)
    await a.reserve(["s1"], "running")
    await a.reserve_or_wait(["s1"], "t1")
    assert (await a.release("s1", "running")).handed == ["t1"]
    assert await a.leave("t1") is False
    assert await a.slots("s1") == (0, 1)
    assert (await a.release("s1", "t1")).held is True
    assert await a.slots("s1") == (1, 0)


async def test_a_dead_replicas_waiters_are_dropped_and_the_slot_goes_to_a_live_one(
    redis_server: RedisServer,
) -> None:
    """A ticket its replica stopped renewing is dropped when it reaches the head of the queue;
    a renewed one behind it is served."""
    clients = [Redis.from_url(redis_server.url) for _ in range(2)]
    try:
        dead, alive = (
            RedisLeases(client, "fleet", replica=name, lease_timeout=0.3)
            for client, name in zip(clients, ("dead", "alive"), strict=True)
        )
        await alive.report("s1", slots_total=1, slots_processing=0, usable=True)
        await alive.reserve(["s1"], "running")
        assert await dead.reserve_or_wait(["s1"], "dead-1") is None
        assert await alive.reserve_or_wait(["s1"], "alive-1") is None
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await alive.renew("s1", ["running"]) == 1
            assert await alive.renew_tickets(["alive-1"]) == 1
        assert (await alive.release("s1", "running")).handed == ["alive-1"]
    finally:
        for client in clients:
            await client.aclose()


async def test_a_freed_slot_goes_to_the_oldest_waiter_among_its_servers_models(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """Waiters for m1 and for any model, arriving in turn at two replicas, are served by a
    server of m1 in the order they arrived, across the two queues."""
    a, b = replicas
    await a.report("s1", slots_total=1, slots_processing=0, usable=True, models=["m1"])
    assert await a.reserve(["s1"], "running") == "s1"
    arrivals = [("t1", "m1"), ("t2", None), ("t3", None), ("t4", "m1"), ("t5", None)]
    for number, (ticket, model) in enumerate(arrivals):
        waiting = await (a, b)[number % 2].reserve_or_wait(["s1"], ticket, model=model)
        assert waiting is None
    served, lease = [], "running"
    for _ in arrivals:
        (lease,) = (await a.release("s1", lease, models=["m1"])).handed
        served.append(lease)
    assert served == ["t1", "t2", "t3", "t4", "t5"]


async def test_a_reservation_may_take_the_server_with_the_most_free_slots_fleet_wide(
    replicas: tuple[RedisLeases, RedisLeases],
) -> None:
    """With ``most_free``, the candidate with the most free slots whichever replica holds the
    others' leases: reservations from two replicas spread evenly."""
    a, b = replicas
    for name in ("s1", "s2"):
        await a.report(name, slots_total=4, slots_processing=0, usable=True)
    assert await a.reserve(["s1", "s2"], "first") == "s1"
    chosen = [
        await (a, b)[n % 2].reserve(["s1", "s2"], f"lease-{n}", most_free=True) for n in range(7)
    ]
    assert chosen == ["s2", "s1", "s2", "s1", "s2", "s1", "s2"]
    assert await a.reserve(["s1", "s2"], "full", most_free=True) is None
