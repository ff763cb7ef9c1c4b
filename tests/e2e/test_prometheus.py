"""End to end: a real Prometheus server scrapes the balancer in front of a real llama.cpp."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.support.agent import running_agent
from tests.support.balancer import running_balancer, wait_until
from tests.support.llamacpp import running_llamacpp
from tests.support.prometheus import INSTALL_HINT, running_prometheus


async def test_prometheus_scrapes_the_fleet_and_the_traffic(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Prometheus sees the fleet's slots, the agent's labels and a request by route and status."""
    async with (
        running_balancer() as running,
        running_llamacpp(slots=2, alias="tiny") as server,
        running_agent(
            llamacpp_port=server.port,
            management_port=running.balancer.management_port or 0,
            name="agent-0",
        ),
        running_prometheus(
            session, tmp_path, [f"127.0.0.1:{running.balancer.management_port}"]
        ) as prometheus,
    ):
        await wait_until(lambda: running.pool.snapshot().usable_agents == 1, timeout=20)
        body = {"prompt": "Hello", "n_predict": 4}
        async with session.post(f"{running.proxy_url}/completion", json=body) as response:
            assert response.status == 200
            await response.read()

        expected = {
            'up{job="paddler"}': 1,
            "paddler_slots": 2,
            "paddler_slots_idle": 2,
            "paddler_agents_usable": 1,
            'paddler_agent_slots{agent="agent-0",model="tiny"}': 2,
            'paddler_requests_total{route="/completion",status="200",outcome="completed"}': 1,
            'paddler_time_to_first_chunk_seconds_count{route="/completion"}': 1,
        }
        seen: dict[str, float | None] = {}

        async def scraped() -> bool:
            for expression in expected:
                seen[expression] = await prometheus.value(expression)
            return seen == expected

        try:
            await wait_until(scraped, timeout=10, interval=0.2)
        except TimeoutError:
            log = prometheus.log.read_text()[-3000:]
            pytest.fail(f"Prometheus saw {seen}, not {expected}; its log:\n{log}")


async def test_the_exposition_passes_promtool_lint(session: aiohttp.ClientSession) -> None:
    """Names, types, help and units follow Prometheus conventions, as promtool checks them."""
    promtool = shutil.which("promtool")
    assert promtool is not None, f"promtool is not installed: {INSTALL_HINT}"
    async with running_balancer(request_buffer_size=0) as running:
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 503  # no agent, no buffer: labelled series exist now
        async with session.get(f"{running.management_url}/metrics") as response:
            exposition = await response.read()
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate(exposition)
    assert check.returncode == 0, output.decode()
    assert b"paddler_requests_total" in exposition
