"""End to end with ``--workers``: real llama.cpp, real agents, worker processes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.support.balancer import wait_until
from tests.support.fleet import Fleet
from tests.support.fleet import fleet as shared_fleet
from tests.support.metrics import llamacpp_metrics, tokens_predicted, watching_llamacpp

TOKEN = "e2e-workers-token"


@contextlib.asynccontextmanager
async def fleet(count: int, **options: object) -> AsyncIterator[Fleet]:
    async with shared_fleet(count, token=TOKEN, workers=2, **options) as cluster:
        yield cluster


async def _proxied_requests(session: aiohttp.ClientSession, management_url: str) -> float:
    async with session.get(f"{management_url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("paddler_requests_total{")
    )


async def test_two_workers_never_oversubscribe_llamacpp_and_count_every_request(
    session: aiohttp.ClientSession,
) -> None:
    """Three times more clients than slots, spread by the kernel over two worker processes:
    llama.cpp never queues a request (one fleet host counts every slot), every request is
    served, none is left reserved, and ``/metrics`` counts them all."""
    async with fleet(2, slots=2, request_buffer_size=100) as cluster:

        async def generate(number: int) -> int:
            predicted = 0
            for turn in range(2):
                # A connection each: the kernel spreads connections, not requests.
                async with (
                    aiohttp.ClientSession() as own,
                    own.post(
                        f"{cluster.balancer.proxy_url}/completion",
                        json={
                            "prompt": f"request {number}.{turn}",
                            "n_predict": 64,
                            "ignore_eos": True,
                            "stream": (number + turn) % 2 == 0,
                        },
                    ) as response,
                ):
                    assert response.status == 200, await response.text()
                    text = await response.text()
                predicted += tokens_predicted(text)
            return predicted

        urls = [server.url for server in cluster.servers]
        async with watching_llamacpp(session, urls) as watch:
            predicted = await asyncio.gather(*(generate(n) for n in range(12)))
        deferred, processing = watch.deferred, watch.processing
        assert predicted == [2 * 64] * 12
        assert len(deferred) > 20
        assert max(deferred) == 0
        assert max(processing) == 2
        pool = cluster.balancer.pool
        await wait_until(lambda: all(agent.reserved == 0 for agent in pool.agents()))
        counted = 0.0

        async def all_counted() -> bool:
            nonlocal counted
            counted = await _proxied_requests(session, cluster.balancer.management_url)
            return counted == 24

        await wait_until(all_counted)
        async with session.get(f"{cluster.balancer.proxy_url}/health") as health:
            assert health.status == 200
            assert (await health.json())["slots_idle"] == 4


async def test_killed_workers_release_their_slots_and_are_started_again(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """SIGKILL every worker mid-stream: the fleet host releases the stream's slot, the
    workers come back on the same port, and the next request is served."""
    async with fleet(1, slots=1, model=slow_model) as cluster:
        workers = cluster.balancer.workers
        assert workers is not None
        response = await session.post(
            f"{cluster.balancer.proxy_url}/completion",
            json={"prompt": "tell me", "n_predict": 4000, "ignore_eos": True, "stream": True},
        )
        assert response.status == 200
        assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        agent = cluster.balancer.pool.agents()[0]
        assert agent.reserved == 1
        killed = workers.pids()
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: agent.reserved == 0)
        response.close()
        await wait_until(lambda: len(workers.pids()) == 2 and not set(workers.pids()) & set(killed))
        server = cluster.servers[0]

        async def slot_idle() -> bool:
            return (await llamacpp_metrics(session, server.url))["requests_processing"] == 0

        await wait_until(slot_idle)

        async def served() -> bool:
            try:
                async with session.post(
                    f"{cluster.balancer.proxy_url}/completion",
                    json={"prompt": "again", "n_predict": 4, "ignore_eos": True},
                ) as again:
                    return again.status == 200
            except aiohttp.ClientConnectionError:
                return False  # the workers are still starting

        await wait_until(served, timeout=20)
        await wait_until(lambda: agent.reserved == 0)  # released once the answer went out
