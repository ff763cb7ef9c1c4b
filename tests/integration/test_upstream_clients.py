"""Both upstream clients (``--upstream-client httptools`` and ``aiohttp``) keep the same promises
through the balancer: headers, keys, keep-alive, read timeouts, aborts and backpressure.

The rest of the suite runs the default client; this runs each behaviour that the client itself
implements once per client. Faults are fakes (``test_frozen_upstream``'s stalling servers); the
happy path is real llama.cpp.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from paddler.config import UPSTREAM_CLIENTS
from tests.integration.test_frozen_upstream import (
    events_of,
    register,
    serves,
    stalling,
    unreachable,
)
from tests.support.balancer import running_balancer, wait_until
from tests.support.llamacpp import running_llamacpp
from tests.support.upstream import closing_keepalive_upstream, fake_upstream

pytestmark = [pytest.mark.both_event_loops, pytest.mark.parametrize("client", UPSTREAM_CLIENTS)]


async def echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "path": request.raw_path,
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
        },
        headers={"Keep-Alive": "timeout=5, max=100", "X-Upstream": "echo"},
    )


async def test_headers_pass_minus_hop_by_hop_ones_and_the_clients_keys(
    session: aiohttp.ClientSession, client: str
) -> None:
    """The path, body and end-to-end headers arrive as sent; hop-by-hop headers and the
    client's keys do not, and the balancer's --llamacpp-api-key goes instead."""
    async with (
        fake_upstream(echo) as port,
        running_balancer(upstream_client=client, llamacpp_api_key="servers-key") as running,
    ):
        await register(session, running.management_url, "echo", port)
        async with session.post(
            URL(f"{running.proxy_url}/completion?x=%2F1", encoded=True),
            data=b'{"prompt": "hi"}',
            headers={
                "Authorization": "Bearer clients-key",
                "X-Api-Key": "clients-key",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Dropped",
                "X-Dropped": "gone",
                "Proxy-Authorization": "secret",
            },
        ) as response:
            assert response.status == 200
            assert response.headers["X-Upstream"] == "echo"
            assert "Keep-Alive" not in response.headers
            seen = await response.json()
    assert seen["path"] == "/completion?x=%2F1"
    assert seen["body"] == '{"prompt": "hi"}'
    headers = seen["headers"]
    assert headers["Authorization"] == "Bearer servers-key"
    assert headers["X-Custom"] == "kept"
    assert headers["Content-Length"] == "16"
    for dropped in ("X-Api-Key", "X-Dropped", "Proxy-Authorization"):
        assert dropped not in headers
    assert headers["Host"] == running.proxy_url.removeprefix("http://")


async def test_a_pooled_connection_closed_by_the_server_is_invisible(
    session: aiohttp.ClientSession, client: str
) -> None:
    """llama.cpp ending a keep-alive connection under a request: it is resent on a fresh one."""
    async with (
        closing_keepalive_upstream() as (port, counts),
        running_balancer(upstream_client=client) as running,
    ):
        await register(session, running.management_url, "closer", port)
        for number in range(10):
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                assert response.status == 200, number
                assert await response.json() == {"ok": True}
        assert counts["answered"] == 10
        assert counts["dropped"] > 0


async def test_a_server_silent_before_its_headers_is_left_for_another(
    session: aiohttp.ClientSession, client: str
) -> None:
    """Past the read timeout without headers, another server serves; the silent one was asked
    once."""
    async with (
        stalling(mid_stream=False) as stalled,
        fake_upstream(serves) as healthy,
        running_balancer(upstream_client=client, upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "silent", stalled.port, idle=4)
        await register(session, running.management_url, "healthy", healthy, idle=1)
        async with asyncio.timeout(10):
            async with session.post(f"{running.proxy_url}/completion", json={}) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == "healthy"
        assert stalled.hits == 1


async def test_a_stream_that_goes_silent_ends_with_an_error_event(
    session: aiohttp.ClientSession, client: str
) -> None:
    """The events so far, then the SSE error event naming the read timeout."""
    async with (
        stalling(mid_stream=True) as stalled,
        running_balancer(upstream_client=client, upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "silent", stalled.port)
        async with asyncio.timeout(10):
            async with session.post(
                f"{running.proxy_url}/v1/chat/completions", json={}
            ) as response:
                events = events_of((await response.read()).decode())
        assert events[:2] == [{"n": 1}, {"n": 2}]
        assert "no byte for 0.3s (--upstream-read-timeout)" in str(events[2]["error"])
        (agent,) = running.pool.agents()
        assert (agent.in_flight, agent.circuit_open) == (0, True)


async def test_an_unreachable_report_ends_a_stream_at_once(
    session: aiohttp.ClientSession, client: str
) -> None:
    """The agent reporting llama.cpp gone aborts the stream long before any read timeout."""
    async with (
        stalling(mid_stream=True) as stalled,
        running_balancer(upstream_client=client) as running,
    ):
        frozen = await register(session, running.management_url, "frozen", stalled.port)
        url = f"{running.proxy_url}/v1/chat/completions"
        async with session.post(url, json={}) as response:
            await wait_until(lambda: stalled.hits == 1)
            await response.content.readuntil(b'{"n": 2}\n\n')
            await frozen.report(unreachable())
            async with asyncio.timeout(10):
                events = events_of((await response.read()).decode())
        assert "error" in events[0]
        assert running.pool.agents()[0].in_flight == 0


async def test_a_slow_client_holds_a_large_answer_back_without_a_read_timeout(
    session: aiohttp.ClientSession, client: str
) -> None:
    """A client reading more slowly than the read timeout pauses the server, which is then not
    silent: the whole body arrives."""
    size = 4 * 1024 * 1024

    async def large(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // 65536):
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    async with (
        fake_upstream(large) as port,
        running_balancer(upstream_client=client, upstream_read_timeout=0.3) as running,
    ):
        await register(session, running.management_url, "large", port)
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            received = len(await response.content.read(65536))
            await asyncio.sleep(1.0)  # the slowness under test, not a wait for readiness
            received += len(await response.read())
    assert received == size


async def test_a_stream_to_a_client_that_falls_behind_and_catches_up_arrives_in_order(
    session: aiohttp.ClientSession, client: str
) -> None:
    """Chunks go to the client as they arrive while it keeps up, are held while it is behind,
    and go as they arrive again once it has caught up: every byte arrives, in order."""
    chunks = [b"%06d:" % number + bytes([65 + number % 26]) * 4089 for number in range(2000)]

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number, chunk in enumerate(chunks):
            await response.write(chunk)
            if number % 200 == 0:
                await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async with (
        fake_upstream(stream) as port,
        running_balancer(upstream_client=client) as running,
    ):
        await register(session, running.management_url, "stream", port)
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            received = await response.content.readexactly(64 * 1024)
            await asyncio.sleep(1.0)  # behind: the balancer's writes to it fill up and pause
            received += await response.read()
    assert received == b"".join(chunks)


@pytest.mark.llamacpp
async def test_real_llamacpp_answers_and_streams_through_the_balancer(
    session: aiohttp.ClientSession, client: str
) -> None:
    """A completion (Content-Length) and streams (chunked SSE, after which llama.cpp closes the
    connection) in turn on one server: every one arrives whole."""
    async with running_llamacpp() as server, running_balancer(upstream_client=client) as running:
        await register(session, running.management_url, "llama", server.port)
        await wait_until(lambda: bool(running.pool.agents()) and running.pool.agents()[0].usable)
        for stream in (False, True, True, False, False):
            body = {"prompt": "hi", "n_predict": 3, "ignore_eos": True, "stream": stream}
            async with session.post(f"{running.proxy_url}/completion", json=body) as response:
                assert response.status == 200
                text = (await response.read()).decode()
            if stream:
                assert response.content_type == "text/event-stream"
                events = events_of(text)
                assert events[-1]["stop"] is True
            else:
                assert json.loads(text)["tokens_predicted"] == 3
