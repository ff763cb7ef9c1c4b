"""The fleet's members in a real Redis (``fleet/redis_registry``): what one replica writes, the
others follow at once; a replica that starts later reads the whole fleet; records expire."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from paddler.balancer.fleet.redis_registry import AgentRecord, Change, RedisRegistry
from tests.support.redis_server import RedisServer, running_redis

RECORD = AgentRecord(
    id="gpu-1@10.0.0.7:8088",
    name="gpu-1",
    scheme="http",
    host="10.0.0.7",
    port=8088,
    models=("qwen", "qwen.gguf"),
    slots_total=4,
    state="ok",
    error=None,
    verified=True,
    owner="",
)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


@contextlib.asynccontextmanager
async def registry(
    server: RedisServer, replica: str, stale_after: float = 30.0
) -> AsyncIterator[tuple[RedisRegistry, asyncio.Queue[Change]]]:
    """A replica's registry, following the fleet: its changes in the queue."""
    client = Redis.from_url(server.url)
    members = RedisRegistry(client, "fleet", replica=replica, stale_after=stale_after)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    ready = asyncio.Event()
    following = asyncio.create_task(members.follow(changes.put_nowait, ready))
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        yield members, changes
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await client.aclose()


async def next_change(changes: asyncio.Queue[Change]) -> Change:
    async with asyncio.timeout(5):
        return await changes.get()


async def test_what_one_replica_writes_the_others_follow(redis_server: RedisServer) -> None:
    """A registration at A, then a report, then a departure: B hears each, in order, with A as
    the owner."""
    async with registry(redis_server, "a") as (a, _), registry(redis_server, "b") as (b, seen):
        await a.put(RECORD)
        first = await next_change(seen)
        assert first == replace(RECORD, owner="a", version=1)
        await a.put(replace(RECORD, state="unreachable", error="connection refused"))
        second = await next_change(seen)
        assert isinstance(second, AgentRecord)
        assert (second.state, second.error, second.version) == (
            "unreachable",
            "connection refused",
            2,
        )
        assert await a.remove(RECORD.id) is True
        assert await next_change(seen) == (RECORD.id, 3)
        assert b.agents == {}


async def test_a_replica_that_starts_later_reads_the_whole_fleet(
    redis_server: RedisServer,
) -> None:
    """Agents written before it started are in its view once it is ready, without a change."""
    async with registry(redis_server, "a") as (a, _):
        for number in range(50):
            await a.put(replace(RECORD, id=f"gpu-{number}@10.0.0.7:{9000 + number}"))
        async with registry(redis_server, "late") as (late, _):
            assert len(late.agents) == 50
            assert {record.owner for record in late.agents.values()} == {"a"}


async def test_an_older_change_never_replaces_a_newer_one() -> None:
    """Changes may arrive out of order (the snapshot and the channel): the newest wins, and a
    removal is not undone by an older record."""
    members = RedisRegistry(Redis(), "fleet", replica="x", stale_after=1.0)
    assert members.apply(replace(RECORD, version=2, slots_total=8)) is True
    assert members.apply(replace(RECORD, version=1, slots_total=4)) is False
    assert members.agents[RECORD.id].slots_total == 8
    assert members.apply((RECORD.id, 3)) is True
    assert members.apply(replace(RECORD, version=2)) is False
    assert members.agents == {}


async def test_a_record_its_owner_stops_writing_expires(redis_server: RedisServer) -> None:
    """An owner that died writes no more: the record is gone after ``stale_after``, and its
    removal is heard by the followers; one written again in time stays."""
    async with (
        registry(redis_server, "dead", stale_after=0.2) as (dead, _),
        registry(redis_server, "alive", stale_after=0.2) as (alive, seen),
    ):
        await dead.put(replace(RECORD, id="orphan@10.0.0.8:8088"))
        await alive.put(RECORD)
        for _ in range(4):
            await asyncio.sleep(0.1)  # the expiry itself is what is tested
            await alive.put(RECORD)
        assert await alive.reap() == 1
        changes = [await next_change(seen) for _ in range(7)]
        assert ("orphan@10.0.0.8:8088", 2) in changes
        assert set(alive.agents) == {RECORD.id}


async def test_a_malformed_change_on_the_channel_is_ignored(redis_server: RedisServer) -> None:
    """Something that is not a record (a bug, another program) is skipped, and following
    goes on."""
    async with registry(redis_server, "a") as (a, seen):
        publisher = Redis.from_url(redis_server.url)
        try:
            await publisher.publish(a.channel, b"not json")
            await publisher.publish(a.channel, b'{"id": "x"}')
        finally:
            await publisher.aclose()
        await a.put(RECORD)
        assert await next_change(seen) == replace(RECORD, owner="a", version=1)
