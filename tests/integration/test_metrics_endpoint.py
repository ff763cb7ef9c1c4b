"""``GET /metrics`` on the management port, after real traffic through the proxy port."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.prometheus import sample
from tests.support.upstream import fake_upstream, not_found


async def echo(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


async def scrape(session: aiohttp.ClientSession, running: RunningBalancer) -> str:
    async with session.get(f"{running.management_url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def test_the_management_port_serves_the_fleet_in_the_text_format(
    session: aiohttp.ClientSession,
) -> None:
    """A scrape shows the fleet's slots and each agent's, labelled by agent and model."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=3, processing=1, models=("tiny",)))
        text = await scrape(session, running)
        assert sample(text, "paddler_slots") == 4
        assert sample(text, "paddler_slots_idle") == 3
        assert sample(text, "paddler_agent_slots_processing", agent="a", model="tiny") == 1
        await agent.close()


async def test_a_retry_and_the_circuit_it_opens_are_counted(
    session: aiohttp.ClientSession,
) -> None:
    """A refused connection counts a failure, a circuit opening, a retry and one 200."""
    async with fake_upstream(echo) as good_port, running_balancer() as running:
        dead = ScriptedAgent(session, running.management_url)
        await dead.register_departed("dead", ok(idle=4))
        good = ScriptedAgent(session, running.management_url)
        await good.register("good", good_port, ok(idle=1))
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 200
        text = await scrape(session, running)
        assert sample(text, "paddler_request_retries_total", route="/completion") == 1
        assert sample(text, "paddler_circuit_openings_total") == 1
        assert sample(text, "paddler_upstream_failures_total", reason="connect_failed") == 1
        completed = {"route": "/completion", "status": "200", "outcome": "completed"}
        assert sample(text, "paddler_requests_total", **completed) == 1
        assert sample(text, "paddler_time_to_first_chunk_seconds_count", route="/completion") == 1
        assert sample(text, "paddler_agent_usable", agent="dead") == 0
        await dead.close()
        await good.close()


async def test_a_full_buffer_and_a_buffer_timeout_are_counted(
    session: aiohttp.ClientSession,
) -> None:
    """With every slot busy, one request overflows the buffer at once and one times out in it."""
    async with (
        fake_upstream(not_found) as port,
        running_balancer(request_buffer_size=1, request_buffer_timeout=0.3) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("busy", port, ok(idle=0, processing=2))

        async def post() -> int:
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                return response.status

        waiting = asyncio.create_task(post())
        await wait_until(lambda: running.balancer.buffer.waiting == 1)
        assert sample(await scrape(session, running), "paddler_requests_buffered") == 1
        assert await post() == 503
        assert await waiting == 504
        text = await scrape(session, running)
        assert sample(text, "paddler_buffer_overflows_total") == 1
        assert sample(text, "paddler_buffer_timeouts_total") == 1
        full = {"route": "/completion", "status": "503", "outcome": "buffer_full"}
        assert sample(text, "paddler_requests_total", **full) == 1
        timed_out = {"route": "/completion", "status": "504", "outcome": "buffer_timeout"}
        assert sample(text, "paddler_requests_total", **timed_out) == 1
        assert sample(text, "paddler_buffer_wait_seconds_count", route="/completion") == 2
        assert sample(text, "paddler_requests_buffered") == 0
        await agent.close()


async def test_openmetrics_is_served_to_scrapers_that_ask_for_it(
    session: aiohttp.ClientSession,
) -> None:
    """A scraper that accepts OpenMetrics (as Prometheus does) gets it, ending in # EOF."""
    async with running_balancer() as running:
        headers = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"}
        async with session.get(f"{running.management_url}/metrics", headers=headers) as response:
            assert response.content_type == "application/openmetrics-text"
            assert (await response.text()).endswith("# EOF\n")
