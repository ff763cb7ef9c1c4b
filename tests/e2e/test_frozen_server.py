"""A llama.cpp server that stops answering (SIGSTOP) ends its streams cleanly, and comes back.

Real llama.cpp servers, real agents. The frozen server's agent finds it unreachable within its
llama.cpp timeout (3 s); the balancer then ends every stream running there with the SSE error
event, serves new requests on the other server, and uses the frozen one again once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.balancer import wait_until
from tests.support.fleet import Fleet, fleet

# Long enough that a stream is still running when the test freezes its server (the slow model
# makes about 1,500 tokens/s on one core, shared here by two streams).
LONG_STREAM = {"prompt": "once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}


@dataclass(eq=False)
class Stream:
    """One client's stream: who serves it, and how it ended."""

    agent: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[dict[str, object]] = field(default_factory=list)
    ended_at: float | None = None

    @property
    def error(self) -> dict[str, object] | None:
        last = self.events[-1] if self.events else None
        return last if last is not None and "error" in last else None


async def run_stream(session: aiohttp.ClientSession, proxy: str, stream: Stream) -> None:
    async with session.post(f"{proxy}/v1/completions", json=LONG_STREAM) as response:
        assert response.status == 200
        stream.agent = response.headers["X-Paddler-Agent"]
        async for line in response.content:
            if line.startswith(b"data: {"):
                stream.events.append(json.loads(line[6:]))
                stream.started.set()
        stream.ended_at = time.monotonic()


@contextlib.asynccontextmanager
async def frozen(pid: int) -> AsyncIterator[float]:
    """SIGSTOP ``pid`` for the block (yields when); SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        os.kill(pid, signal.SIGCONT)


async def streams_on_one_server(
    session: aiohttp.ClientSession, cluster: Fleet
) -> tuple[str, dict[Stream, asyncio.Task[None]]]:
    """Fill every slot with a long stream; return a server running two of them once both
    started, and every stream with its task."""
    running = {
        stream: asyncio.create_task(run_stream(session, cluster.balancer.proxy_url, stream))
        for stream in [Stream() for _ in range(4)]
    }
    async with asyncio.timeout(30):
        while True:
            for name in cluster.names:
                if sum(s.agent == name and s.started.is_set() for s in running) == 2:
                    return name, running
            waits = [asyncio.create_task(stream.started.wait()) for stream in running]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()


async def test_a_frozen_server_ends_its_streams_and_serves_again_once_it_thaws(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """SIGSTOP of a llama.cpp with two streams running: both clients get the SSE error event
    and the end of the stream within seconds, no reservation leaks, new requests go to the
    other server, and after SIGCONT the frozen server serves again."""
    async with fleet(2, slots=2, model=slow_model, circuit_breaker_cooldown=0.5) as cluster:
        proxy = cluster.balancer.proxy_url
        pool = cluster.balancer.pool
        name, running = await streams_on_one_server(session, cluster)
        (other,) = (n for n in cluster.names if n != name)
        victims = [stream for stream in running if stream.agent == name]
        async with frozen(cluster.server(name).pid) as frozen_at:
            # The other server's streams are not the subject: their clients leave.
            for stream, task in running.items():
                if stream not in victims:
                    task.cancel()
            async with asyncio.timeout(30):
                await asyncio.gather(*(running[stream] for stream in victims))
            for stream in victims:
                assert stream.error is not None, stream.events[-1:]
                error = stream.error["error"]
                assert isinstance(error, dict)
                assert error["type"] == "server_error"
                assert f"{name} reported its llama.cpp unreachable" in str(error["message"])
                assert stream.ended_at is not None
                assert stream.ended_at - frozen_at < 20
            # No reservation leaked, and /health counts the other server's slots, all idle.
            await wait_until(
                lambda: all(
                    agent.in_flight == 0 and agent.busy_slots() == 0 for agent in pool.agents()
                )
            )
            async with session.get(f"{proxy}/health") as response:
                health = await response.json()
            assert health["slots_processing"] == 0
            assert health["slots_idle"] == 2
            body = {"prompt": "hi", "max_tokens": 4}
            async with session.post(f"{proxy}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == other
        thawed = next(agent for agent in pool.agents() if agent.name == name)
        await wait_until(thawed.usable, timeout=30)
        # Four streams on four slots: two of them must be the thawed server's.
        again = [Stream() for _ in range(4)]
        tasks = [asyncio.create_task(run_stream(session, proxy, stream)) for stream in again]
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(stream.started.wait() for stream in again))
            assert sorted(stream.agent for stream in again) == sorted([name, name, other, other])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_host_that_freezes_with_its_agent_ends_its_streams_once_they_stall(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """SIGSTOP of a llama.cpp and of its agent (a paused host: no report will ever say
    unreachable): once the agent is removed for silence and the streams receive nothing for as
    long again, both clients get the SSE error event, not minutes of nothing; new requests go
    to the other server, and after SIGCONT the host serves again."""
    stale_after = 3.0
    async with fleet(
        2, slots=2, model=slow_model, circuit_breaker_cooldown=0.5, agent_stale_after=stale_after
    ) as cluster:
        proxy = cluster.balancer.proxy_url
        name, running = await streams_on_one_server(session, cluster)
        (other,) = (n for n in cluster.names if n != name)
        victims = [stream for stream in running if stream.agent == name]
        agent_process = cluster.agents[cluster.names.index(name)]
        async with frozen(agent_process.pid), frozen(cluster.server(name).pid) as frozen_at:
            for stream, task in running.items():
                if stream not in victims:
                    task.cancel()
            async with asyncio.timeout(30):
                await asyncio.gather(*(running[stream] for stream in victims))
            for stream in victims:
                assert stream.error is not None, stream.events[-1:]
                message = str(stream.error["error"]["message"])  # type: ignore[index]
                assert f"{name} stopped reporting and its llama.cpp sent nothing" in message
                assert stream.ended_at is not None
                assert stream.ended_at - frozen_at < 20
            async with session.get(f"{proxy}/health") as response:
                health = await response.json()
            assert (health["slots_processing"], health["slots_idle"]) == (0, 2)
            body = {"prompt": "hi", "max_tokens": 4}
            async with session.post(f"{proxy}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == other
        pool = cluster.balancer.pool
        await wait_until(
            lambda: any(agent.name == name and agent.usable() for agent in pool.agents()),
            timeout=30,
        )
