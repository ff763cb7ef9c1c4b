"""What a client connection may cost the balancer: head and body deadlines, keep-alive, a cap.

Raw sockets stand for the clients, because no HTTP client can be made to trickle a head or stall
a body; a fake upstream stands for llama.cpp where the test needs a stream longer than every
timeout. Timing bounds are wide: the machine's CPUs are shared. Each test runs on both servers of
the proxy port (``--proxy-server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from paddler.balancer.service import MANAGEMENT_CONNECTION_HEADROOM
from paddler.config import PROXY_SERVERS
from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer
from tests.support.logs import watching
from tests.support.upstream import fake_upstream

pytestmark = pytest.mark.both_event_loops

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

_proxy_server = {"name": PROXY_SERVERS[0]}


@pytest.fixture(autouse=True, params=PROXY_SERVERS)
def proxy_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The proxy port's server for the balancers this test starts."""
    _proxy_server["name"] = request.param
    yield request.param
    _proxy_server["name"] = PROXY_SERVERS[0]


async def answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.json_response({"content": "hi"})


@contextlib.asynccontextmanager
async def balancer_with_agent(
    session: aiohttp.ClientSession, handler: object = answer, **overrides: object
) -> AsyncIterator[RunningBalancer]:
    async with (
        fake_upstream(handler) as port,  # type: ignore[arg-type]
        balancer(**overrides) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("fake", port, ok(idle=100))
        try:
            yield running
        finally:
            await agent.close()


_opened: list[asyncio.StreamWriter] = []


async def connect(url: str) -> Connection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    _opened.append(writer)
    return reader, writer


@contextlib.asynccontextmanager
async def balancer(**overrides: object) -> AsyncIterator[RunningBalancer]:
    """A balancer; the raw connections opened meanwhile are closed before it stops."""
    overrides.setdefault("proxy_server", _proxy_server["name"])
    async with running_balancer(**overrides) as running:
        try:
            yield running
        finally:
            while _opened:
                writer = _opened.pop()
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


async def closed_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from ``started`` until the balancer closed the connection (reading what comes)."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return time.monotonic() - started


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def completion_request(body: bytes = b'{"prompt": "hi"}') -> bytes:
    return (
        b"POST /completion HTTP/1.1\r\nHost: balancer\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_trickling_connections_are_closed_at_the_header_timeout_while_requests_are_served(
    session: aiohttp.ClientSession,
) -> None:
    """300 connections trickling a head byte a second all close within the header timeout."""
    timeout = 1.5
    async with balancer_with_agent(session, client_header_timeout=timeout) as running:
        started = time.monotonic()
        connections = [await connect(running.proxy_url) for _ in range(300)]
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Trickle: " + b"a" * 1000

        async def trickle() -> None:
            for position in range(len(head)):
                for _, writer in connections:
                    if not writer.is_closing():
                        writer.write(head[position : position + 1])
                await asyncio.sleep(1.0)

        async def serve_meanwhile() -> int:
            served = 0
            while time.monotonic() - started < timeout + 1:
                async with session.post(
                    running.proxy_url + "/completion", json={"prompt": "hi"}
                ) as response:
                    assert response.status == 200, await response.text()
                    served += 1
                await asyncio.sleep(0.1)
            return served

        trickling = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(timeout + 8):
                served, *lifetimes = await asyncio.gather(
                    serve_meanwhile(),
                    *(closed_after(reader, started) for reader, _ in connections),
                )
        finally:
            trickling.cancel()
        assert served >= 5
        assert max(lifetimes) < timeout + 5, max(lifetimes)
        assert min(lifetimes) >= timeout * 0.9


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout() -> None:
    """A silent connection lives as long as the header timeout, and is then closed, logged."""
    timeout = 1.0
    with watching("paddler.balancer.proxy.client_connections") as log:
        async with balancer(client_header_timeout=timeout) as running:
            reader, _ = await connect(running.proxy_url)
            started = time.monotonic()
            async with asyncio.timeout(timeout + 8):
                lifetime = await closed_after(reader, started)
            assert timeout * 0.9 <= lifetime < timeout + 5
            [line] = await log.wait_for(logging.INFO, containing="--client-header-timeout")
            assert "sent nothing within 1s" in line


async def test_a_body_that_stops_midway_gets_408_and_gives_its_memory_back(
    session: aiohttp.ClientSession,
) -> None:
    """A stalled body is answered 408 at the body timeout; its bytes return to the budget."""
    with watching("paddler.balancer.proxy.reverse_proxy") as log:
        async with balancer_with_agent(
            session, client_body_timeout=1.0, request_body_memory=100
        ) as running:
            reader, writer = await connect(running.proxy_url)
            writer.write(
                b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"x" * 60
            )
            started = time.monotonic()
            async with asyncio.timeout(8):
                status, headers, body = await read_response(reader)
            assert status == 408
            assert time.monotonic() - started >= 0.9
            assert headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["code"] == 408
            assert error["type"] == "invalid_request_error"
            await log.wait_for(logging.INFO, containing="--client-body-timeout")
            # 90 of the 100 bytes: taken only if the stalled 60 were given back.
            async with session.post(running.proxy_url + "/completion", data=b"y" * 90) as response:
                assert response.status == 200, await response.text()


async def test_an_idle_kept_alive_connection_is_closed_and_a_prompt_second_request_served(
    session: aiohttp.ClientSession,
) -> None:
    """Keep-alive idles end at the keep-alive timeout; a second request before it is served,
    however long after the first the connection opened."""
    async with balancer_with_agent(
        session, client_header_timeout=0.5, client_keepalive_timeout=1.5
    ) as running:
        reader, writer = await connect(running.proxy_url)
        writer.write(completion_request())
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(1.0)  # past the header timeout, within the keep-alive timeout
        writer.write(completion_request())
        assert (await read_response(reader))[0] == 200
        idle_since = time.monotonic()
        async with asyncio.timeout(10):
            idle = await closed_after(reader, idle_since)
        assert 1.5 * 0.9 <= idle < 1.5 + 5


async def test_connections_over_the_cap_get_503_and_cost_no_memory_and_service_resumes(
    session: aiohttp.ClientSession,
) -> None:
    """With a cap of 50, 30 more connections get a JSON 503 and are closed; later ones serve."""
    async with balancer_with_agent(
        session, max_client_connections=50, client_header_timeout=60
    ) as running:
        before = rss_bytes()
        held = [await connect(running.proxy_url) for _ in range(50)]
        extra = [await connect(running.proxy_url) for _ in range(30)]
        for _, writer in extra:
            writer.write(completion_request())
        async with asyncio.timeout(10):
            answers = [await read_response(reader) for reader, _ in extra]
            for reader, _ in extra:
                assert await reader.read() == b""  # closed after the answer
        for status, headers, body in answers:
            assert status == 503
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            error = json.loads(body)["error"]
            assert error["code"] == 503
            assert "--max-client-connections" in error["message"]
        assert rss_bytes() - before < 20 * 1024 * 1024
        for _, writer in held + extra:
            writer.close()
        # aiohttp's session is a new connection too: served once the held ones are gone.
        async with asyncio.timeout(10):
            while True:
                async with session.post(
                    running.proxy_url + "/completion", json={"prompt": "hi"}
                ) as response:
                    if response.status == 200:
                        break
                    assert response.status == 503


async def test_the_management_port_caps_connections_at_one_per_agent_plus_headroom(
    session: aiohttp.ClientSession,
) -> None:
    """Past --max-agents plus the headroom, a management connection gets a JSON 503 naming the
    cap, and the port serves again once connections close."""
    async with balancer(max_agents=4, client_header_timeout=60) as running:
        cap = 4 + MANAGEMENT_CONNECTION_HEADROOM
        held = [await connect(running.management_url) for _ in range(cap)]
        reader, writer = await connect(running.management_url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        async with asyncio.timeout(10):
            status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (503, "close")
        assert "--max-agents 4" in json.loads(body)["error"]["message"]
        for _, held_writer in held:
            held_writer.close()
        async with asyncio.timeout(10):
            while True:
                async with session.get(running.management_url + "/health") as response:
                    if response.status == 200:
                        break
                    assert response.status == 503


async def test_an_agents_websocket_outlives_the_header_timeout_that_closes_a_silent_connection(
    session: aiohttp.ClientSession,
) -> None:
    """The management port closes a silent connection, but never an upgraded WebSocket."""
    timeout = 0.5
    async with balancer(client_header_timeout=timeout, client_keepalive_timeout=timeout) as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("long-lived", 9, ok(idle=2), verified=False)
        reader, _ = await connect(running.management_url)
        async with asyncio.timeout(8):
            await closed_after(reader, time.monotonic())
        await asyncio.sleep(timeout * 3)  # the socket must outlive every timeout, several times
        await agent.report(ok(idle=1, processing=1))
        [listed] = await running.agents(session)
        assert listed["name"] == "long-lived"
        assert agent.socket is not None and not agent.socket.closed
        await agent.close()


async def test_a_stream_longer_than_every_timeout_is_never_cut(
    session: aiohttp.ClientSession,
) -> None:
    """A stream with gaps longer than every client timeout arrives whole, while a silent
    connection beside it is closed."""
    timeout = 0.5

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(4):
            await asyncio.sleep(timeout * 2)
            await response.write(f"data: {number}\n\n".encode())
        await response.write_eof()
        return response

    async with balancer_with_agent(
        session,
        slow_stream,
        client_header_timeout=timeout,
        client_body_timeout=timeout,
        client_keepalive_timeout=timeout,
    ) as running:
        silent_reader, _ = await connect(running.proxy_url)
        silent = asyncio.create_task(closed_after(silent_reader, time.monotonic()))
        async with session.post(
            running.proxy_url + "/completion", json={"prompt": "hi", "stream": True}
        ) as response:
            assert response.status == 200
            events = [line async for line in response.content if line.strip()]
        async with asyncio.timeout(timeout + 5):
            silent_lifetime = await silent
        assert events == [f"data: {number}\n".encode() for number in range(4)]
        assert silent_lifetime < timeout + 2  # closed while the stream still ran
