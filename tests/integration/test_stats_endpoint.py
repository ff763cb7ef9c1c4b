"""``GET /api/v1/stats`` on a running balancer: real sockets, a fake upstream for the 5xx."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import fake_upstream


async def stats(session: aiohttp.ClientSession, running: RunningBalancer) -> dict[str, Any]:
    async with session.get(f"{running.management_url}/api/v1/stats") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


def totals(body: dict[str, Any], field: str) -> int:
    return sum(second[field] for second in body["series"])


async def test_stats_count_proxied_requests_and_errors_second_by_second(
    session: aiohttp.ClientSession,
) -> None:
    """Answered requests and a relayed 500 appear in the series, with the fleet's slots."""

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/fail":
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"ok": True})

    async with fake_upstream(answer) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=3, processing=1))
        for path in ("/completion", "/completion", "/fail"):
            async with session.post(f"{running.proxy_url}{path}", data=b"{}") as response:
                await response.read()

        async def counted() -> bool:
            body = await stats(session, running)
            return totals(body, "requests") == 3 and totals(body, "errors") == 1

        await wait_until(counted, timeout=5)
        await wait_until(
            lambda: (
                running.balancer.stats_history.series()
                and running.balancer.stats_history.series()[-1]["slots_total"] == 4
            ),
            timeout=5,
        )
        body = await stats(session, running)
        assert body["interval_seconds"] == 1
        assert body["window_seconds"] == 600
        times = [second["t"] for second in body["series"]]
        assert times == sorted(times)
        assert times == list(range(times[0], times[0] + len(times)))
        assert body["series"][-1]["slots_processing"] == 1
        assert body["series"][-1]["requests_buffered"] == 0
        await agent.close()


async def test_requests_refused_by_a_full_buffer_count_as_errors(
    session: aiohttp.ClientSession,
) -> None:
    """With no agent and no buffer room, each request is a 503 and an error in the stats."""
    async with running_balancer(request_buffer_size=0) as running:
        for _ in range(2):
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                assert response.status == 503

        async def counted() -> bool:
            body = await stats(session, running)
            return totals(body, "errors") == 2

        await wait_until(counted, timeout=5)
        body = await stats(session, running)
        assert totals(body, "requests") == 2
        assert body["series"][-1]["slots_total"] == 0
