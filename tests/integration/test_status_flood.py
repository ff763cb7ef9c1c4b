"""One agent flooding its socket with status frames cannot slow the balancer for anybody else."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import aiohttp

from tests.support.balancer import running_balancer
from tests.support.logs import watching
from tests.support.upstream import fake_upstream, not_found

FRAMES = 50_000
ROOT = Path(__file__).resolve().parents[2]


async def test_a_status_flood_is_throttled_then_cut_while_health_stays_fast(
    session: aiohttp.ClientSession,
) -> None:
    """50,000 frames from one socket: /health stays fast, and the flooder is closed with 1008.

    The flooder runs in a process of its own. Each /health is timed twice: by the wall clock
    (loosely bounded: two shared cores, other processes run too), and by the CPU this process
    spent while it waited, which is the time the event loop was busy with something else (the
    flood), whatever the scheduler does.
    """
    async with (
        fake_upstream(not_found) as port,
        running_balancer() as running,
    ):
        with watching("paddler.balancer.management.agent_socket") as logs:
            flooder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.status_flood",
                "flood",
                running.management_url,
                str(port),
                str(FRAMES),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
            )
            assert flooder.stdout is not None
            try:
                async with asyncio.timeout(30):
                    assert await flooder.stdout.readline() == b"registered\n"
                    ended = asyncio.create_task(flooder.stdout.readline())
                    walls: list[float] = []
                    busy: list[float] = []
                    while not ended.done():
                        started, cpu = time.perf_counter(), time.process_time()
                        async with session.get(f"{running.management_url}/health") as response:
                            assert response.status == 200
                        walls.append(time.perf_counter() - started)
                        busy.append(time.process_time() - cpu)
                        await asyncio.sleep(0.005)
                    closed = (await ended).split()
            finally:
                if flooder.returncode is None:
                    flooder.kill()
                await flooder.wait()
            await logs.wait_for(logging.WARNING, containing="frames per second")
    assert closed[:2] == [b"closed", b"1008"]
    assert len(walls) > 100
    assert max(busy) < 0.05, f"the loop was busy for {max(busy) * 1000:.0f} ms"
    assert max(walls) < 0.25, f"/health took {max(walls) * 1000:.0f} ms"
