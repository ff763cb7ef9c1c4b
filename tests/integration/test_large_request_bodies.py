"""A huge JSON body does not hold the event loop: other requests' streams keep flowing.

The fakes stand for llama.cpp servers that answer instantly, so that the only thing between a
stream's chunks is the balancer's event loop (which the test's clients and fakes share too).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.support.balancer import ScriptedAgent, ok, running_balancer
from tests.support.upstream import fake_upstream

pytestmark = pytest.mark.both_event_loops

OBJECTS = 2_000_000
"""Small objects in a large body: the densest work for a JSON parser per byte."""

TICK = 0.01
"""The fake stream's interval between chunks."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WIDE_BOUND = 0.3
"""The largest gap allowed between a stream's chunks: the target is 50 ms; the margin is for a
shared CPU. Parsing such a body on the event loop makes gaps of 0.8 s and more."""


def huge_chat_body(model: str) -> bytes:
    """About 30 MB: two million small messages, and the model named after all of them."""
    messages = b",".join([b'{"content":""}'] * OBJECTS)
    return b'{"messages":[' + messages + b'],"model":"' + model.encode() + b'"}'


def streaming(stop: asyncio.Event) -> Handler:
    """Streams a completion until ``stop``; any other request is answered at once."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path != "/completion":
            return web.json_response({"content": "ok"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while not stop.is_set():
            await response.write(b'data: {"content":"x"}\n\n')
            await asyncio.sleep(TICK)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handle


def counting(hits: Counter[str], name: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        hits[name] += 1
        return web.json_response({"content": "ok"})

    return handle


@pytest.mark.parametrize("routing", ["prefix", "slots"])
async def test_a_30_mb_json_body_does_not_stall_a_concurrent_stream(
    session: aiohttp.ClientSession, routing: str
) -> None:
    """Two 30 MB bodies being proxied keep a concurrent stream's chunks under 300 ms apart,
    and are still routed by the model they name after 30 MB of messages."""
    body = huge_chat_body("huge")
    stop = asyncio.Event()
    hits: Counter[str] = Counter()
    agents: list[ScriptedAgent] = []
    async with (
        fake_upstream(streaming(stop)) as stream_port,
        fake_upstream(counting(hits, "huge"), client_max_size=len(body)) as huge_port,
        # The scripted agents report once: on a loaded machine the test may outlast the
        # default 5 s of silence after which an agent is dropped.
        running_balancer(routing=routing, agent_stale_after=600.0) as running,
    ):
        # A request routed without its model would go to the agent with the most free slots.
        for name, port, idle, models in (
            ("stream", stream_port, 8, ("small",)),
            ("huge", huge_port, 2, ("huge",)),
        ):
            agent = ScriptedAgent(session, running.management_url)
            agents.append(agent)
            await agent.register(name, port, ok(idle=idle, models=models))
        arrivals: list[float] = []
        streaming_began = asyncio.Event()
        async with session.post(
            f"{running.proxy_url}/completion",
            json={"model": "small", "prompt": "go", "stream": True},
        ) as stream:
            assert stream.headers["X-Paddler-Agent"] == "stream"

            async def read_stream() -> None:
                async for _ in stream.content.iter_any():
                    arrivals.append(time.perf_counter())
                    streaming_began.set()

            reader = asyncio.create_task(read_stream())

            async def send_huge() -> str:
                async with session.post(
                    f"{running.proxy_url}/v1/chat/completions",
                    data=io.BytesIO(body),
                    headers={"Content-Type": "application/json"},
                ) as response:
                    assert response.status == 200
                    return response.headers["X-Paddler-Agent"]

            try:
                await streaming_began.wait()
                began = len(arrivals)
                served_by = await asyncio.gather(send_huge(), send_huge())
                ended = len(arrivals)
            finally:
                stop.set()
                await reader
        for agent in agents:
            await agent.close()
    assert served_by == ["huge", "huge"]
    assert hits["huge"] == 2
    during = arrivals[began - 1 : ended + 1]
    gaps = [later - earlier for earlier, later in itertools.pairwise(during)]
    assert len(gaps) > 10, "the stream must overlap the large bodies"
    print(f"largest gap between chunks: {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < WIDE_BOUND, f"a stream chunk waited {max(gaps) * 1000:.0f} ms"
