"""``GET /api/v1/autoscaling`` on the management port, for a fleet in a known state."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from paddler.balancer.management.autoscaling import RULE
from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import fake_upstream, not_found


async def advice(session: aiohttp.ClientSession, running: RunningBalancer) -> dict[str, Any]:
    async with session.get(f"{running.management_url}/api/v1/autoscaling") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_the_advice_describes_the_fleet_and_applies_the_rule(
    session: aiohttp.ClientSession,
) -> None:
    """Two servers of 4 slots with 6 busy, at a 0.5 target, need ceil(6 / 4 / 0.5) = 3 servers."""
    async with (
        fake_upstream(not_found) as first_port,
        fake_upstream(not_found) as second_port,
        running_balancer(autoscaling_target_utilization=0.5) as running,
    ):
        first = ScriptedAgent(session, running.management_url)
        await first.register("a", first_port, ok(idle=1, processing=3))
        second = ScriptedAgent(session, running.management_url)
        await second.register("b", second_port, ok(idle=1, processing=3))
        assert await advice(session, running) == {
            "servers": 2,
            "slots_total": 8,
            "slots_busy": 6,
            "requests_buffered": 0,
            "utilization": 0.75,
            "target_utilization": 0.5,
            "slots_per_server": 4.0,
            "desired_servers": 3,
            "suggested_change": 1,
            "rule": RULE,
        }
        await first.close()
        await second.close()


async def test_a_buffered_request_with_no_server_asks_for_one_and_waits_for_it(
    session: aiohttp.ClientSession,
) -> None:
    """Scale from zero: the request waits in the buffer, the advice asks for +1, the server comes."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"content": "hi"})

    async with fake_upstream(answer) as port, running_balancer() as running:
        assert (await advice(session, running))["desired_servers"] == 0

        async def post() -> int:
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                return response.status

        request = asyncio.create_task(post())
        await wait_until(lambda: running.balancer.buffer.waiting == 1)
        body = await advice(session, running)
        assert body["servers"] == 0
        assert body["requests_buffered"] == 1
        assert body["slots_per_server"] is None
        assert body["desired_servers"] == 1
        assert body["suggested_change"] == 1

        agent = ScriptedAgent(session, running.management_url)
        await agent.register("first", port, ok(idle=4))
        assert await request == 200

        async def settled() -> bool:
            return (await advice(session, running))["desired_servers"] == 0

        await wait_until(settled)  # the slot is released just after the answer is sent
        await agent.close()
