"""The balancer counts a server only once it reached it, and only the slots the server has."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.llamacpp import running_llamacpp
from tests.support.prometheus import sample
from tests.support.upstream import fake_upstream, not_found

CLAIMED = 60_000


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def capacity(session: aiohttp.ClientSession, running: RunningBalancer) -> dict[str, Any]:
    """What /health, the autoscaling advice and /metrics count as the fleet's capacity."""
    async with session.get(f"{running.proxy_url}/health") as response:
        health = await response.json()
    async with session.get(f"{running.management_url}/api/v1/autoscaling") as response:
        advice = await response.json()
    async with session.get(f"{running.management_url}/metrics") as response:
        metrics = await response.text()
    return {
        "health_idle": health["slots_idle"],
        "advice_servers": advice["servers"],
        "advice_slots": advice["slots_total"],
        "advice_change": advice["suggested_change"],
        "metrics_slots": sample(metrics, "paddler_slots"),
        "metrics_agent_slots": sample(metrics, "paddler_agent_slots", agent="rogue"),
        "metrics_usable": sample(metrics, "paddler_agent_usable", agent="rogue"),
    }


async def test_an_unreachable_registration_is_never_counted(
    session: aiohttp.ClientSession,
) -> None:
    """A claim of 60,000 idle slots at a closed port adds nothing to /health, advice or metrics."""
    async with running_balancer() as running:
        rogue = ScriptedAgent(session, running.management_url)
        await rogue.register("rogue", closed_port(), ok(idle=CLAIMED), verified=False)

        async def tried_twice() -> bool:
            [listed] = await running.agents(session)
            return "cannot reach" in (listed["verification"] or "")

        await wait_until(tried_twice)
        nothing = {
            "health_idle": 0,
            "advice_servers": 0,
            "advice_slots": 0,
            "advice_change": 0,
            "metrics_slots": 0,
            "metrics_agent_slots": 0,
            "metrics_usable": 0,
        }
        for _ in range(20):  # over a second and more: the verifier keeps trying meanwhile
            assert await capacity(session, running) == nothing
            await asyncio.sleep(0.1)
        [listed] = await running.agents(session)
        assert listed["verified"] is False
        assert listed["slots_total"] == 0
        assert running.pool.agents()[0].usable() is False
        await rogue.close()


async def test_a_reachable_server_is_counted_within_its_own_total_slots(
    session: aiohttp.ClientSession,
) -> None:
    """Once the balancer reached the server, it counts at most /props total_slots there."""
    async with fake_upstream(not_found, total_slots=4) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("boaster", port, ok(idle=CLAIMED))
        async with session.get(f"{running.proxy_url}/health") as response:
            assert (await response.json())["slots_idle"] == 4
        [listed] = await running.agents(session)
        assert listed["verified"] is True
        assert listed["slots_total"] == 4
        assert "total_slots=4" in listed["verification"]
        await agent.close()


@contextlib.asynccontextmanager
async def guarded_llamacpp(key: str, seen: list[str | None]) -> AsyncIterator[int]:
    """llama.cpp with an API key: /health is public, /props needs the key (2 slots)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response(
                {"error": {"code": 401, "message": "Invalid API Key"}}, status=401
            )
        return web.json_response({"total_slots": 2})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_without_readable_props_the_slot_flag_bounds_a_server(
    session: aiohttp.ClientSession,
) -> None:
    """A server whose /props needs a key the balancer lacks counts --max-slots-per-agent."""
    seen: list[str | None] = []
    async with (
        guarded_llamacpp("secret", seen) as port,
        running_balancer(max_slots_per_agent=3) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("guarded", port, ok(idle=CLAIMED))
        [listed] = await running.agents(session)
        assert listed["slots_total"] == 3
        assert "--llamacpp-api-key" in listed["verification"]
        assert seen == [None]
        await agent.close()


async def test_the_llamacpp_api_key_lets_the_balancer_read_props(
    session: aiohttp.ClientSession,
) -> None:
    """With --llamacpp-api-key the balancer reads /props, and bounds the slots by it."""
    seen: list[str | None] = []
    async with (
        guarded_llamacpp("secret", seen) as port,
        running_balancer(llamacpp_api_key="secret") as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("guarded", port, ok(idle=CLAIMED))
        [listed] = await running.agents(session)
        assert listed["slots_total"] == 2
        assert seen == ["Bearer secret"]
        await agent.close()


async def test_a_loading_server_is_reachable_and_bounded_once_it_loaded(
    session: aiohttp.ClientSession,
) -> None:
    """llama.cpp's 503 while loading proves the address; /props is asked again until it answers."""
    loaded = asyncio.Event()

    async def loading_then_ready(request: web.Request) -> web.Response:
        if not loaded.is_set():
            body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            return web.json_response(body, status=503)
        return web.json_response({"total_slots": 2} if request.path == "/props" else {})

    app = web.Application()
    app.router.add_get("/{tail:.*}", loading_then_ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        async with running_balancer(max_slots_per_agent=5) as running:
            agent = ScriptedAgent(session, running.management_url)
            await agent.register("loading", port, ok(idle=CLAIMED))
            [listed] = await running.agents(session)
            assert listed["slots_total"] == 5
            assert "while llama.cpp loads" in listed["verification"]
            loaded.set()

            async def bounded() -> bool:
                [listed] = await running.agents(session)
                return bool(listed["slots_total"] == 2)

            await wait_until(bounded)
            await agent.close()
    finally:
        await runner.cleanup()


async def test_an_agent_that_comes_back_at_another_address_is_verified_again(
    session: aiohttp.ClientSession,
) -> None:
    """Verified at one address, re-registered at a closed one: the new address counts nothing."""
    async with fake_upstream(not_found, total_slots=4) as port, running_balancer() as running:
        first = ScriptedAgent(session, running.management_url)
        await first.register("mover", port, ok(idle=4))
        await first.close()
        await wait_until(lambda: running.pool.agents() == [])
        moved = ScriptedAgent(session, running.management_url)
        await moved.register("mover", closed_port(), ok(idle=4), verified=False)

        async def tried() -> bool:
            [listed] = await running.agents(session)
            return "cannot reach" in (listed["verification"] or "")

        await wait_until(tried)
        async with session.get(f"{running.proxy_url}/health") as response:
            assert response.status == 503
            assert (await response.json())["slots_idle"] == 0
        await moved.close()


@pytest.mark.llamacpp
async def test_a_real_llamacpp_is_counted_with_its_own_slots(
    session: aiohttp.ClientSession,
) -> None:
    """An agent claiming 60,000 slots for a real llama.cpp of 2 gets 2 counted."""
    async with running_llamacpp(slots=2) as server, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("claims-too-much", server.port, ok(idle=CLAIMED))
        async with session.get(f"{running.proxy_url}/health") as response:
            assert (await response.json())["slots_idle"] == 2
        [listed] = await running.agents(session)
        assert listed["verification"] == "/props total_slots=2"
        await agent.close()
