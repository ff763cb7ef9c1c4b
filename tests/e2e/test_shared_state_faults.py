"""``--state redis://`` under faults: a balancer killed with SIGKILL mid-stream, and Redis
restarting empty, with real llama.cpp, real agents and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.e2e.test_shared_state import idle_slots, shared_fleet
from tests.support.agent import running_agent
from tests.support.balancer import running_balancer, wait_until
from tests.support.llamacpp import running_llamacpp, stop_process
from tests.support.metrics import llamacpp_metrics, watching_llamacpp
from tests.support.processes import paddler_process
from tests.support.redis_server import running_redis

_LISTENING = re.compile(r"(management|reverseproxy) listening on \w+://[^:]+:(\d+)")


@contextlib.asynccontextmanager
async def balancer_process(*flags: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``paddler balancer FLAGS`` as a process of its own; its proxy URL once it listens."""
    process = await paddler_process(
        "balancer", "--management-port=0", "--reverseproxy-port=0", *flags
    )
    assert process.stderr is not None
    ports: dict[str, int] = {}
    try:
        async with asyncio.timeout(30):
            while "reverseproxy" not in ports:
                line = (await process.stderr.readline()).decode()
                assert line, "the balancer exited before it listened"
                if found := _LISTENING.search(line):
                    ports[found[1]] = int(found[2])
        draining = asyncio.create_task(process.stderr.read())  # its log must not fill the pipe
        yield process, f"http://127.0.0.1:{ports['reverseproxy']}"
        draining.cancel()
    finally:
        await stop_process(process)


async def test_a_balancer_killed_mid_stream_gives_its_slots_back_to_the_fleet(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """SIGKILL a balancer while a stream it relays holds one of two slots: the other balancer
    counts the slot busy until the killed one's lease times out, then serves two streams at once
    there, and llama.cpp never queues a request."""
    async with (
        running_redis() as redis,
        running_llamacpp(slow_model, slots=2) as server,
        running_balancer(state=redis.url, lease_timeout=1.0) as survivor,
        running_agent(
            llamacpp_port=server.port,
            management_port=survivor.balancer.management_port or 0,
            name="agent-0",
        ),
    ):
        await wait_until(lambda: survivor.pool.agents() and survivor.pool.agents()[0].verified)
        async with balancer_process(f"--state={redis.url}", "--lease-timeout=1s") as (doomed, url):

            async def counted() -> bool:
                async with session.get(f"{url}/health") as response:
                    return int((await response.json())["slots_idle"]) == 2

            await wait_until(counted, timeout=10)
            stream = await session.post(
                f"{url}/completion",
                json={"prompt": "tell me", "n_predict": 4000, "ignore_eos": True, "stream": True},
            )
            assert stream.status == 200
            assert (await stream.content.readuntil(b"\n\n")).startswith(b"data: ")
            assert await idle_slots(session, survivor) == 1
            os.kill(doomed.pid, signal.SIGKILL)
            await doomed.wait()
            stream.close()

        async def freed() -> bool:
            metrics = await llamacpp_metrics(session, server.url)
            return metrics["requests_processing"] == 0 and await idle_slots(session, survivor) == 2

        await wait_until(freed, timeout=15)

        async def generate(number: int) -> None:
            async with session.post(
                f"{survivor.proxy_url}/completion",
                json={"prompt": f"again {number}", "n_predict": 32, "ignore_eos": True},
            ) as response:
                assert response.status == 200

        async with watching_llamacpp(session, [server.url]) as watch:
            await asyncio.gather(*(generate(n) for n in range(4)))
        assert max(watch.deferred) == 0
        assert max(watch.processing) == 2


async def test_the_fleet_reconverges_after_redis_restarts_empty(
    session: aiohttp.ClientSession,
) -> None:
    """Redis killed and started again with nothing in it: within a few seconds both balancers
    count every slot again (each writes its agents back), a request that waited through the
    restart is served, and requests at both never make llama.cpp queue."""
    async with shared_fleet(session, request_buffer_size=100) as cluster:
        await cluster.redis.restart()

        async def reconverged() -> bool:
            try:
                return all([await idle_slots(session, b) == 4 for b in cluster.balancers])
            except (aiohttp.ClientError, KeyError, ValueError):
                return False

        await wait_until(reconverged, timeout=15)

        async def generate(number: int) -> None:
            async with session.post(
                f"{cluster.balancers[number % 2].proxy_url}/completion",
                json={"prompt": f"after {number}", "n_predict": 32, "ignore_eos": True},
            ) as response:
                assert response.status == 200, await response.text()

        urls = [server.url for server in cluster.servers]
        async with watching_llamacpp(session, urls) as watch:
            await asyncio.gather(*(generate(n) for n in range(12)))
        assert max(watch.deferred) == 0
