"""Both servers of the proxy port (``--proxy-server httptools`` and ``aiohttp``) keep the same
promises on the wire: pipelining, HTTP/1.0, HEAD, Expect: 100-continue, chunked bodies, keep-alive
and its timeouts, the connection cap, streams, a client leaving and graceful shutdown.

The rest of the suite runs the default server; this runs each behaviour that the server itself
implements once per server. Raw sockets stand for the clients (no HTTP client pipelines or sends
HTTP/1.0 on demand); a fake upstream stands for llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from paddler.config import PROXY_SERVERS
from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.logs import watching
from tests.support.upstream import fake_upstream

pytestmark = [pytest.mark.both_event_loops, pytest.mark.parametrize("server", PROXY_SERVERS)]

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def echo(request: web.Request) -> web.Response:
    return web.json_response(
        {"path": request.raw_path, "body": (await request.read()).decode()},
        headers={"X-Upstream": "echo"},
    )


@contextlib.asynccontextmanager
async def proxy(
    session: aiohttp.ClientSession, server: str, handler: object = echo, **overrides: object
) -> AsyncIterator[RunningBalancer]:
    async with (
        fake_upstream(handler) as port,  # type: ignore[arg-type]
        running_balancer(proxy_server=server, **overrides) as running,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("fake", port, ok(idle=8))
        try:
            yield running
        finally:
            await agent.close()


@contextlib.asynccontextmanager
async def connected(running: RunningBalancer) -> AsyncIterator[Connection]:
    host, port = running.proxy_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One response: its status line, headers (lower-case names) and body (by its length, by
    chunks, or to the close)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), 10)
    return lines[0], headers, body


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: balancer\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def test_pipelined_requests_are_answered_in_order(
    session: aiohttp.ClientSession, server: str
) -> None:
    """Three requests sent in one write get their three answers, in the order they were sent."""
    async with proxy(session, server) as running, connected(running) as (reader, writer):
        writer.write(b"".join(post(f"/tokenize?n={n}", b'{"n": %d}' % n) for n in range(3)))
        for n in range(3):
            status, _, body = await read_response(reader)
            assert status == "HTTP/1.1 200 OK"
            assert json.loads(body)["path"] == f"/tokenize?n={n}"


async def test_an_http_1_0_request_is_answered_and_its_connection_closed(
    session: aiohttp.ClientSession, server: str
) -> None:
    """An HTTP/1.0 request without keep-alive gets its answer, then the connection closes."""
    async with proxy(session, server) as running, connected(running) as (reader, writer):
        writer.write(b"GET /echo HTTP/1.0\r\nHost: balancer\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status.split()[1] == "200"
        assert json.loads(body)["path"] == "/echo"
        assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_head_request_gets_the_head_alone_and_the_connection_serves_another(
    session: aiohttp.ClientSession, server: str
) -> None:
    """HEAD /health gets the status and headers without a body; the next request on the same
    connection is answered."""
    async with proxy(session, server) as running, connected(running) as (reader, writer):
        writer.write(b"HEAD /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["status"] == "ok"


async def test_expect_100_continue_gets_a_continue_before_the_answer(
    session: aiohttp.ClientSession, server: str
) -> None:
    """A client that waits for 100 Continue before its body gets it, then the answer."""
    async with proxy(session, server) as running, connected(running) as (reader, writer):
        writer.write(
            b"POST /tokenize HTTP/1.1\r\nHost: balancer\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"{}")
        status, _, body = await read_response(reader)
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["body"] == "{}"


async def test_a_chunked_body_arrives_whole_and_one_past_the_limit_gets_413(
    session: aiohttp.ClientSession, server: str
) -> None:
    """A chunked request body reaches the server joined; one larger than
    --max-request-body-size gets 413 in the OpenAI shape."""
    async with proxy(session, server, max_request_body_size=1000) as running:
        async with connected(running) as (reader, writer):
            writer.write(
                b"POST /tokenize HTTP/1.1\r\nHost: balancer\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            status, _, body = await read_response(reader)
            assert status == "HTTP/1.1 200 OK"
            assert json.loads(body)["body"] == "abcde"
        async with connected(running) as (reader, writer):
            writer.write(
                b"POST /tokenize HTTP/1.1\r\nHost: balancer\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"400\r\n"
                + b"x" * 1024
                + b"\r\n0\r\n\r\n"
            )
            status, _, body = await read_response(reader)
            assert status.split()[1] == "413"
            assert json.loads(body)["error"]["code"] == 413


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    session: aiohttp.ClientSession, server: str
) -> None:
    """After an answer, a connection that sends nothing more is closed at
    --client-keepalive-timeout."""
    async with (
        proxy(session, server, client_keepalive_timeout=0.3) as running,
        connected(running) as (reader, writer),
    ):
        writer.write(b"GET /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_late_head_closes_the_connection_with_a_log_line(
    session: aiohttp.ClientSession, server: str
) -> None:
    """A connection that sends half a head is closed at --client-header-timeout and logged."""
    async with (
        proxy(session, server, client_header_timeout=0.3) as running,
        connected(running) as (reader, writer),
    ):
        with watching("paddler.balancer.proxy.client_connections") as log:
            writer.write(b"GET /health HTTP/1.1\r\nHo")
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
            await log.wait_for(logging.INFO, containing="a partial request head")


async def test_connections_past_the_cap_get_503_with_connection_close(
    session: aiohttp.ClientSession, server: str
) -> None:
    """With --max-client-connections 1, a second connection gets the canned 503 and a close."""
    async with (
        proxy(session, server, max_client_connections=1) as running,
        connected(running) as (first_reader, first_writer),
    ):
        first_writer.write(b"GET /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        await read_response(first_reader)
        async with connected(running) as (reader, _):
            status, headers, body = await read_response(reader)
        assert status.split()[1] == "503"
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "unavailable_error"


async def test_a_stream_is_relayed_chunk_by_chunk_and_the_connection_kept(
    session: aiohttp.ClientSession, server: str
) -> None:
    """An event stream reaches the client as it is generated (chunked), and the connection then
    serves another request."""
    proceed = asyncio.Event()

    async def stepwise(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await proceed.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with proxy(session, server, stepwise) as running, connected(running) as (reader, writer):
        writer.write(post("/completion", b"{}"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"chunked" in head.lower()
        first = await asyncio.wait_for(reader.readexactly(len(b"9\r\ndata: 1\n\n\r\n")), 10)
        assert first == b"9\r\ndata: 1\n\n\r\n"
        proceed.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert b"data: [DONE]" in rest
        writer.write(b"GET /health HTTP/1.1\r\nHost: balancer\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == "HTTP/1.1 200 OK"


async def test_a_client_that_hangs_up_mid_generation_frees_its_slot(
    session: aiohttp.ClientSession, server: str
) -> None:
    """Closing the connection while the server generates cancels the request: its slot is
    released and nothing stays reserved."""
    started = asyncio.Event()
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.Response:
        started.set()
        await finished.wait()
        return web.json_response({})

    async with proxy(session, server, endless) as running:
        async with connected(running) as (_, writer):
            writer.write(post("/completion", b"{}"))
            await asyncio.wait_for(started.wait(), 10)
            assert running.pool.agents()[0].reserved == 1
        await wait_until(lambda: running.pool.agents()[0].reserved == 0)
        finished.set()


async def test_shutdown_lets_a_running_request_finish_and_answers_it(
    session: aiohttp.ClientSession, server: str
) -> None:
    """A request in flight when the balancer stops is answered before its connection closes."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"done": True})

    async with fake_upstream(slow) as port:
        async with running_balancer(proxy_server=server) as running:
            agent = ScriptedAgent(session, running.management_url)
            await agent.register("slow", port, ok(idle=1))
            reader, writer = await asyncio.open_connection(
                *running.proxy_url.removeprefix("http://").rsplit(":", 1)
            )
            writer.write(post("/completion", b"{}"))
            await wait_until(lambda: running.pool.agents()[0].reserved == 1)
            asyncio.get_running_loop().call_later(0.3, release.set)
        status, _, body = await read_response(reader)
        writer.close()
        await agent.close()
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body) == {"done": True}
