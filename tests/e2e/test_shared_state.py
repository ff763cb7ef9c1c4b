"""End to end with ``--state redis://``: two balancers on one real Redis, real llama.cpp, real
agents, each agent reporting to one balancer, clients at both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from tests.support.agent import running_agent
from tests.support.balancer import RunningBalancer, running_balancer, wait_until
from tests.support.llamacpp import LlamaCppServer, running_llamacpp
from tests.support.metrics import tokens_predicted, watching_llamacpp
from tests.support.redis_server import RedisServer, running_redis


@dataclass
class SharedFleet:
    redis: RedisServer
    balancers: list[RunningBalancer]
    servers: list[LlamaCppServer]


async def idle_slots(session: aiohttp.ClientSession, balancer: RunningBalancer) -> int:
    async with session.get(f"{balancer.proxy_url}/health") as response:
        return int((await response.json())["slots_idle"])


@contextlib.asynccontextmanager
async def shared_fleet(
    session: aiohttp.ClientSession, *, slots: int = 2, **options: object
) -> AsyncIterator[SharedFleet]:
    """Two balancers on one Redis, two llama.cpp servers, the first's agent reporting to the
    first balancer and the second's to the second; both balancers count every slot on entry."""
    async with running_redis() as redis, contextlib.AsyncExitStack() as stack:
        balancers = [
            await stack.enter_async_context(running_balancer(state=redis.url, **options))
            for _ in range(2)
        ]
        servers = []
        for index, balancer in enumerate(balancers):
            server = await stack.enter_async_context(running_llamacpp(slots=slots))
            await stack.enter_async_context(
                running_agent(
                    llamacpp_port=server.port,
                    management_port=balancer.balancer.management_port or 0,
                    name=f"agent-{index}",
                )
            )
            servers.append(server)

        async def counted() -> bool:
            return all([await idle_slots(session, balancer) == 2 * slots for balancer in balancers])

        await wait_until(counted, timeout=30)
        yield SharedFleet(redis, balancers, servers)


async def test_two_balancers_on_one_redis_never_oversubscribe_llamacpp(
    session: aiohttp.ClientSession,
) -> None:
    """Three times more clients than slots, half at each balancer, and each balancer sending
    to both servers: llama.cpp never queues a request (every slot is counted once, whichever
    balancer reserved it), every request is served, and no slot is left reserved."""
    async with shared_fleet(session, request_buffer_size=100) as cluster:
        served_by: set[tuple[int, str]] = set()

        async def generate(number: int) -> int:
            balancer = cluster.balancers[number % 2]
            predicted = 0
            for turn in range(2):
                async with session.post(
                    f"{balancer.proxy_url}/completion",
                    json={
                        "prompt": f"request {number}.{turn}",
                        "n_predict": 128,
                        "ignore_eos": True,
                        "stream": (number + turn) % 2 == 0,
                    },
                ) as response:
                    assert response.status == 200, await response.text()
                    served_by.add((number % 2, response.headers["X-Paddler-Agent"]))
                    text = await response.text()
                predicted += tokens_predicted(text)
            return predicted

        urls = [server.url for server in cluster.servers]
        async with watching_llamacpp(session, urls) as watch:
            predicted = await asyncio.gather(*(generate(n) for n in range(12)))
        assert predicted == [2 * 128] * 12
        # Each balancer sent requests to both servers, its own agent's and the other's.
        assert served_by == {(0, "agent-0"), (0, "agent-1"), (1, "agent-0"), (1, "agent-1")}
        assert len(watch.deferred) > 20
        assert max(watch.deferred) == 0
        assert max(watch.processing) == 2

        async def released() -> bool:
            return all([await idle_slots(session, b) == 4 for b in cluster.balancers])

        await wait_until(released)


async def test_a_balancer_that_starts_later_counts_the_whole_fleet_at_once(
    session: aiohttp.ClientSession,
) -> None:
    """A third balancer on the same Redis, with no agent of its own, serves both servers as
    soon as it is ready (well within 2 s)."""
    async with shared_fleet(session) as cluster:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with running_balancer(state=cluster.redis.url) as late:
            ready_after = loop.time() - started
            assert await idle_slots(session, late) == 4
            async with session.post(
                f"{late.proxy_url}/completion", json={"prompt": "hi", "n_predict": 4}
            ) as response:
                assert response.status == 200
        assert ready_after < 2.0
