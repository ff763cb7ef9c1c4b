"""StatsD gauges, received on a real UDP socket from a running balancer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.observability.statsd_reporter import StatsdReporter
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.prometheus import free_port
from tests.support.upstream import fake_upstream


class StatsdServer(asyncio.DatagramProtocol):
    """Keeps every datagram, and the latest value of each gauge."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.gauges: dict[str, int] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.datagrams.append(data)
        name, rest = data.decode().split(":", 1)
        value, kind = rest.split("|")
        assert kind == "g", data
        self.gauges[name] = int(value)

    def shows(self, **expected: int) -> bool:
        return all(self.gauges.get(f"paddler.{name}") == value for name, value in expected.items())


@contextlib.asynccontextmanager
async def statsd_server() -> AsyncIterator[tuple[StatsdServer, int]]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        StatsdServer, local_addr=("127.0.0.1", 0)
    )
    try:
        yield server, int(transport.get_extra_info("sockname")[1])
    finally:
        transport.close()


async def test_gauges_follow_the_slots_and_the_buffer(session: aiohttp.ClientSession) -> None:
    """Idle and busy slots match the agent's report; requests_buffered goes to 3 and back to 0."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async with (
        statsd_server() as (server, port),
        fake_upstream(slow) as upstream_port,
        running_balancer(statsd_enable=True, statsd_port=port, statsd_interval=0.05) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", upstream_port, ok(idle=3, processing=1))
        await wait_until(
            lambda: server.shows(slots_idle=3, slots_processing=1, requests_buffered=0)
        )
        assert b"paddler.slots_idle:3|g" in server.datagrams

        await agent.report(ok(idle=0, processing=4))
        await wait_until(lambda: server.shows(slots_idle=0, slots_processing=4))

        async def post() -> int:
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                return response.status

        requests = [asyncio.create_task(post()) for _ in range(3)]
        await wait_until(lambda: server.shows(requests_buffered=3))

        await agent.report(ok(idle=4))
        await wait_until(lambda: server.shows(requests_buffered=0, slots_processing=3))
        release.set()
        assert await asyncio.gather(*requests) == [200, 200, 200]
        await wait_until(lambda: server.shows(slots_idle=4, slots_processing=0))
        await agent.close()


async def test_the_prefix_names_every_gauge() -> None:
    """--statsd-prefix comes first in every name, with one dot after it."""
    pool = AgentControllerPool()
    reporter = StatsdReporter(
        FleetView(pool),
        RequestBuffer(pool, size=1, timeout=1.0),
        host="127.0.0.1",
        port=1,
        prefix="llm.eu.",
    )
    assert set(await reporter.gauges()) == {
        "llm.eu.requests_buffered",
        "llm.eu.slots_idle",
        "llm.eu.slots_processing",
    }


async def test_a_statsd_server_that_is_down_or_unknown_costs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closed port and a name that does not resolve are logged and tried again, never raised."""
    pool = AgentControllerPool()
    buffer = RequestBuffer(pool, size=1, timeout=1.0)
    caplog.set_level(logging.DEBUG, logger="paddler.balancer.observability.statsd_reporter")
    for host, port, complaint in [
        ("127.0.0.1", free_port(), "statsd send failed"),
        ("statsd.invalid", 8125, "cannot reach statsd at statsd.invalid:8125"),
    ]:
        reporter = StatsdReporter(
            FleetView(pool), buffer, host=host, port=port, prefix="p", interval=0.01
        )
        shutdown = asyncio.Event()
        task = asyncio.create_task(reporter.run(shutdown))
        await wait_until(lambda expected=complaint: caplog.text.count(expected) >= 2)
        assert not task.done()
        shutdown.set()
        await asyncio.wait_for(task, 1)
