"""Servers that stop answering, faked: stalls before the headers and mid-stream, on demand.

Real llama.cpp frozen by SIGSTOP is tests/e2e/test_frozen_server.py; here a fake server stalls
for exactly as long as a test wants, against a small ``--upstream-read-timeout`` or a scripted
agent that reports llama.cpp unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from paddler.protocol import LlamaCppState, Status
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import fake_upstream

pytestmark = pytest.mark.both_event_loops

_agents: list[ScriptedAgent] = []


async def register(
    session: aiohttp.ClientSession, management_url: str, name: str, port: int, idle: int = 2
) -> ScriptedAgent:
    agent = ScriptedAgent(session, management_url)
    _agents.append(agent)  # a collected agent's socket closes, which deregisters it
    await agent.register(name, port, ok(idle=idle))
    return agent


@dataclass
class Stalling:
    port: int
    hits: int = 0
    thaw: asyncio.Event = field(default_factory=asyncio.Event)
    """Set it to let the stalled handlers finish; set in any case when the server stops."""


@contextlib.asynccontextmanager
async def stalling(*, mid_stream: bool) -> AsyncIterator[Stalling]:
    """A server that stalls every request before its headers, or after two events."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        server.hits += 1
        if not mid_stream:
            await server.thaw.wait()
            return web.json_response({"late": True})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await response.write(b'data: {"n": 2}\n\n')
        await server.thaw.wait()
        return response

    async with fake_upstream(handle) as port:
        server = Stalling(port)
        try:
            yield server
        finally:
            server.thaw.set()  # before the fake's shutdown, which waits for its handlers


async def serves(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"content": "served"})


def events_of(text: str) -> list[dict[str, object]]:
    return [json.loads(part[6:]) for part in text.split("\n\n") if part.startswith("data: ")]


def unreachable() -> Status:
    return Status(state=LlamaCppState.UNREACHABLE, error="did not answer GET /health within 3s")


async def test_a_server_silent_before_its_headers_is_left_for_another_and_never_resent(
    session: aiohttp.ClientSession,
) -> None:
    """Past --upstream-read-timeout without headers, the request goes to another server, the
    silent one's circuit opens, and it was asked once: not again on a fresh connection."""
    async with (
        stalling(mid_stream=False) as stalled,
        fake_upstream(serves) as healthy,
        running_balancer(upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "silent", stalled.port, idle=4)
        await register(session, running.management_url, "healthy", healthy, idle=1)
        async with asyncio.timeout(10):
            async with session.post(f"{running.proxy_url}/completion", json={}) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == "healthy"
        assert stalled.hits == 1
        agents = {agent.name: agent for agent in running.pool.agents()}
        assert agents["silent"].circuit_open
        assert all(agent.in_flight == 0 for agent in agents.values())


async def test_a_lone_silent_server_gets_a_502_that_names_the_read_timeout(
    session: aiohttp.ClientSession,
) -> None:
    """No other server: the client hears, in the OpenAI shape, that the server said nothing."""
    async with (
        stalling(mid_stream=False) as stalled,
        running_balancer(upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "silent", stalled.port)
        async with asyncio.timeout(10):
            async with session.post(f"{running.proxy_url}/completion", json={}) as response:
                assert response.status == 502
                error = (await response.json())["error"]
        assert error["type"] == "server_error"
        assert "silent sent no response within 0.3s (--upstream-read-timeout)" in error["message"]
        assert stalled.hits == 1


async def test_a_stream_that_goes_silent_ends_with_an_error_event_after_the_read_timeout(
    session: aiohttp.ClientSession,
) -> None:
    """The events sent so far, then the SSE error event and a clean end; the slot is given
    back and the server's circuit opens."""
    async with (
        stalling(mid_stream=True) as stalled,
        running_balancer(upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "silent", stalled.port)
        async with asyncio.timeout(10):
            async with session.post(
                f"{running.proxy_url}/v1/chat/completions", json={}
            ) as response:
                assert response.status == 200
                events = events_of((await response.read()).decode())
        assert events[:2] == [{"n": 1}, {"n": 2}]
        error = events[2]["error"]
        assert isinstance(error, dict)
        assert error["type"] == "server_error"
        assert "no byte for 0.3s (--upstream-read-timeout)" in str(error["message"])
        (agent,) = running.pool.agents()
        assert (agent.in_flight, agent.reserved) == (0, 0)
        assert agent.circuit_open


async def test_an_unreachable_report_sends_a_request_waiting_for_headers_elsewhere(
    session: aiohttp.ClientSession,
) -> None:
    """Long before the read timeout, the agent's report ends the wait: no byte reached the
    client, so the request is served by another server."""
    async with (
        stalling(mid_stream=False) as stalled,
        fake_upstream(serves) as healthy,
        running_balancer() as running,
    ):
        frozen = await register(session, running.management_url, "frozen", stalled.port, idle=4)
        await register(session, running.management_url, "healthy", healthy, idle=1)
        request = asyncio.create_task(session.post(f"{running.proxy_url}/completion", json={}))
        await wait_until(lambda: stalled.hits == 1)
        await frozen.report(unreachable())
        async with asyncio.timeout(10):
            response = await request
        assert response.status == 200
        assert response.headers["X-Paddler-Agent"] == "healthy"
        response.release()
        assert stalled.hits == 1
        assert all(agent.in_flight == 0 for agent in running.pool.agents())


async def test_an_unreachable_report_ends_the_streams_running_there_with_an_error_event(
    session: aiohttp.ClientSession,
) -> None:
    """Every stream on the server gets the SSE error event naming the cause, at once; the
    other server's stream runs on."""
    async with (
        stalling(mid_stream=True) as stalled,
        stalling(mid_stream=True) as other,
        running_balancer() as running,
    ):
        frozen = await register(session, running.management_url, "frozen", stalled.port, idle=2)

        async def stream() -> list[dict[str, object]]:
            url = f"{running.proxy_url}/v1/chat/completions"
            async with session.post(url, json={}) as response:
                return events_of((await response.read()).decode())

        streams = [asyncio.create_task(stream()) for _ in range(2)]
        await wait_until(lambda: stalled.hits == 2)
        await register(session, running.management_url, "other", other.port, idle=1)
        bystander = asyncio.create_task(stream())
        await wait_until(lambda: other.hits == 1)
        await frozen.report(unreachable())
        async with asyncio.timeout(10):
            ended = await asyncio.gather(*streams)
        for events in ended:
            assert events[:2] == [{"n": 1}, {"n": 2}]
            message = str(events[2]["error"]["message"])  # type: ignore[index]
            assert "frozen reported its llama.cpp unreachable" in message
        agents = {agent.name: agent for agent in running.pool.agents()}
        assert (agents["frozen"].in_flight, agents["frozen"].reserved) == (0, 0)
        assert not bystander.done()
        assert agents["other"].in_flight == 1
        other.thaw.set()
        assert len(await bystander) == 2
