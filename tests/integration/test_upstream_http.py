"""The hand-written upstream client (``paddler.balancer.proxy.upstream_http``) on real sockets.

Keep-alive, chunked bodies and event streams are real llama.cpp's; servers that crash or stall
on demand are raw asyncio servers, scripted byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from paddler.balancer.proxy.upstream_http.failures import (
    BodyBroken,
    ConnectFailed,
    Disconnected,
    ReadTimeout,
)
from paddler.balancer.proxy.upstream_http.pool import ConnectionPool, request_head
from paddler.balancer.proxy.upstream_http.response import HIGH_WATER, Response
from paddler.config import Address
from tests.support.balancer import wait_until
from tests.support.llamacpp import running_llamacpp
from tests.support.prometheus import free_port

pytestmark = pytest.mark.both_event_loops

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[Address, list[int]]]:
    """A server that runs ``script`` on each connection; yields its address and a list that
    grows by one per connection."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Address("http", "127.0.0.1", port), connections
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


@contextlib.asynccontextmanager
async def pool(
    read_timeout: float | None = 5.0, keepalive: float = 2.0
) -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool(
        connect_timeout=2.0, keepalive_timeout=keepalive, read_timeout=read_timeout
    )
    try:
        yield connections
    finally:
        connections.close()


def get(path: str, address: Address) -> bytes:
    return request_head("GET", path, CIMultiDict(Host=address.authority), 0)


def post(path: str, address: Address, body: bytes) -> bytes:
    headers = CIMultiDict({"Host": address.authority, "Content-Type": "application/json"})
    return request_head("POST", path, headers, len(body))


async def whole(response: Response) -> bytes:
    parts = []
    while chunk := await response.content.readany():
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.llamacpp
async def test_a_real_llamacpp_keeps_a_connection_for_100_requests_then_a_new_one_serves() -> None:
    """llama.cpp says Connection: close on a connection's 100th answer: the 101st request opens
    a new connection, and no request fails."""
    async with running_llamacpp() as server, pool() as connections:
        address = Address("http", "127.0.0.1", server.port)
        for _ in range(101):
            response = await connections.exchange(
                address, get("/health", address), b"", head_only=False, fresh=False
            )
            assert response.status == 200
            assert json.loads(await whole(response)) == {"status": "ok"}
            response.release()
        assert connections.opened == 2
        assert connections.idle_connections == 1


@pytest.mark.llamacpp
async def test_a_real_llamacpp_event_stream_is_dechunked_and_its_connection_not_kept() -> None:
    """A stream's chunked body arrives as its events; llama.cpp closes the connection after
    it, so it is never pooled: a connection is opened in its place at once, idle, and the next
    request goes on it."""
    body = json.dumps({"prompt": "hi", "n_predict": 3, "stream": True, "ignore_eos": True})
    async with running_llamacpp() as server, pool() as connections:
        address = Address("http", "127.0.0.1", server.port)
        response = await connections.exchange(
            address, post("/completion", address, body.encode()), body.encode(), head_only=False,
            fresh=False,
        )  # fmt: skip
        assert response.content_type == "text/event-stream"
        assert response.content_length is None
        events = [line for line in (await whole(response)).split(b"\n\n") if line]
        assert all(event.startswith(b"data: {") for event in events)
        assert json.loads(events[-1][len(b"data: ") :])["stop"] is True
        assert response.content.total_bytes == sum(len(event) + 2 for event in events)
        response.release()
        await wait_until(lambda: connections.idle_connections == 1)
        assert connections.opened == 2
        answer = await connections.exchange(
            address, get("/health", address), b"", head_only=False, fresh=False
        )
        assert answer.status == 200
        answer.release()
        assert connections.opened == 2  # the one opened ahead served it


@pytest.mark.llamacpp
async def test_a_real_llamacpp_answer_with_a_length_keeps_its_connection() -> None:
    """A non-streamed completion (Content-Length) leaves its connection idle, for the next."""
    body = json.dumps({"prompt": "hi", "n_predict": 2}).encode()
    async with running_llamacpp() as server, pool() as connections:
        address = Address("http", "127.0.0.1", server.port)
        for _ in range(2):
            response = await connections.exchange(
                address, post("/completion", address, body), body, head_only=False, fresh=False
            )
            assert response.content_length is not None
            assert len(await whole(response)) == response.content_length
            response.release()
        assert connections.opened == 1


async def test_idle_connections_are_closed_after_the_keepalive_timeout() -> None:
    """The pool forgets an idle connection before llama.cpp would: the server sees it close."""
    closed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()  # until the client closes
        closed.set()

    async with scripted_server(script) as (address, _), pool(keepalive=0.2) as connections:
        response = await connections.exchange(
            address, get("/", address), b"", head_only=False, fresh=False
        )
        assert await whole(response) == b"ok"
        response.release()
        assert connections.idle_connections == 1
        async with asyncio.timeout(5):
            await closed.wait()
        assert connections.idle_connections == 0


async def test_a_connection_closed_before_any_response_byte_is_disconnected() -> None:
    """The server reading the request and closing: Disconnected, safe to resend."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with scripted_server(script) as (address, _), pool() as connections:
        with pytest.raises(Disconnected):
            await connections.exchange(address, get("/", address), b"", head_only=False, fresh=True)


async def test_a_refused_connection_is_connect_failed() -> None:
    """Nothing listens: ConnectFailed, which sends the request to another server."""
    address = Address("http", "127.0.0.1", free_port())
    async with pool() as connections:
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await connections.exchange(
                address, get("/", address), b"", head_only=False, fresh=False
            )


async def test_a_connection_not_accepted_within_the_connect_timeout_is_connect_failed() -> None:
    """A server whose accept queue is full (SYNs dropped): ConnectFailed after the connect
    timeout, naming it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # past what the queue holds (its length is the backlog + 1)
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        address = Address("http", "127.0.0.1", port)
        connections = ConnectionPool(connect_timeout=0.3, keepalive_timeout=2, read_timeout=5)
        async with asyncio.timeout(5):
            with pytest.raises(ConnectFailed, match=r"within 0\.3s"):
                await connections.exchange(
                    address, get("/", address), b"", head_only=False, fresh=False
                )
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_server_that_answers_nothing_times_out_before_its_head() -> None:
    """No byte within the read timeout of the request: ReadTimeout."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with scripted_server(script) as (address, _), pool(read_timeout=0.3) as connections:
        with pytest.raises(ReadTimeout):
            await connections.exchange(
                address, get("/", address), b"", head_only=False, fresh=False
            )


async def test_a_stream_that_stalls_times_out_between_chunks_and_one_that_crashes_breaks() -> None:
    """A body with no byte for the read timeout fails with ReadTimeout; one cut off before its
    end with BodyBroken."""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await reader.read()

    async def crashes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    for script, failure in ((stalls, ReadTimeout), (crashes, BodyBroken)):
        async with scripted_server(script) as (address, _), pool(read_timeout=0.3) as connections:
            response = await connections.exchange(
                address, get("/", address), b"", head_only=False, fresh=False
            )
            first = await response.content.readany()
            assert first in (b"first", b"partial")
            with pytest.raises(failure):
                await response.content.readany()
            response.close()


async def test_a_reader_far_behind_pauses_the_server_and_its_read_timeout() -> None:
    """A body read more slowly than the read timeout, with more than HIGH_WATER unread, does
    not time out: the server is held back, not silent."""
    size = 8 * HIGH_WATER

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(8):
            writer.write(b"x" * HIGH_WATER)
            await writer.drain()

    async with scripted_server(script) as (address, _), pool(read_timeout=0.3) as connections:
        response = await connections.exchange(
            address, get("/", address), b"", head_only=False, fresh=False
        )
        received = len(await response.content.readany())
        await asyncio.sleep(1.0)  # the reader is slow: longer than the read timeout
        received += len(await whole(response))
        assert received == size


async def test_a_head_request_ends_with_its_head_and_its_connection() -> None:
    """A HEAD's answer has no body, whatever its Content-Length; its connection is not kept."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        await reader.read()

    async with scripted_server(script) as (address, _), pool() as connections:
        head = request_head("HEAD", "/", CIMultiDict(Host=address.authority), 0)
        response = await connections.exchange(address, head, b"", head_only=True, fresh=False)
        assert response.content_length == 50
        assert await whole(response) == b""
        response.release()
        assert connections.idle_connections == 0


async def test_a_large_body_is_sent_whole_in_pieces() -> None:
    """A request body past a megabyte reaches the server byte for byte."""
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB
    received = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set_result(await reader.readexactly(len(body)))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await reader.read()

    async with scripted_server(script) as (address, _), pool() as connections:
        response = await connections.exchange(
            address, post("/", address, body), body, head_only=False, fresh=False
        )
        assert response.status == 204
        assert await received == body


async def test_a_server_that_closes_while_a_large_body_is_sent_is_disconnected() -> None:
    """The server going away mid-body ends the send with Disconnected, not a write to a closed
    connection."""
    body = b"x" * (8 * 1024 * 1024)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(64 * 1024)
        writer.transport.abort()

    async with scripted_server(script) as (address, _), pool() as connections:
        async with asyncio.timeout(10):
            with pytest.raises(Disconnected):
                await connections.exchange(
                    address, post("/", address, body), body, head_only=False, fresh=False
                )


async def test_a_stream_opens_one_connection_ahead_at_its_head_and_a_whole_answer_none() -> None:
    """An event stream (after which llama.cpp closes the connection) has one connection opened
    in its place as soon as its head arrives, even if its reader gives up on it; one per
    server, and none while one is idle there already. A kept-alive answer opens nothing."""
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in [b"data: 1\n\n"] * 3)
    held = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if b"/stream" in head:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunks
                )
                if b"/stream-held" in head:
                    await writer.drain()
                    await held.wait()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return  # as llama.cpp: the connection closes after a stream
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with scripted_server(script) as (address, accepted), pool() as connections:

        async def exchange(path: str) -> Response:
            return await connections.exchange(
                address, get(path, address), b"", head_only=False, fresh=False
            )

        for _ in range(2):
            answer = await exchange("/whole")
            assert await whole(answer) == b"ok"
            answer.release()
        assert (len(accepted), connections.opened) == (1, 1)  # a kept-alive answer: none
        stream = await exchange("/stream-held")
        assert await stream.content.readany()
        # Its end has not come, and the one in its place is open already.
        await wait_until(lambda: connections.idle_connections == 1)
        assert len(accepted) == 2
        stream.close()  # the reader gave up: llama.cpp must see the connection go
        held.set()
        await asyncio.sleep(0.2)
        assert (len(accepted), connections.idle_connections) == (2, 1)  # nothing more
        for _ in range(3):
            stream = await exchange("/stream")  # on the one opened ahead
            await whole(stream)
            stream.release()
            await wait_until(lambda: connections.idle_connections == 1)
        await asyncio.sleep(0.2)
        assert len(accepted) == 5  # each stream's connection replaced by exactly one
        assert connections.idle_connections == 1


async def test_a_request_sent_as_a_stream_ends_takes_the_connection_being_opened_for_it() -> None:
    """The replacement is opened as a stream's last bytes arrive, and a request sent at once
    (as a client's next turn is) takes it while it is still opening: one handshake, not two."""
    chunk = b"%x\r\n%s\r\n" % (len(b"data: 1\n\n"), b"data: 1\n\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/stream" in head:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with scripted_server(script) as (address, accepted), pool() as connections:
        for path in ("/stream", "/whole"):
            response = await connections.exchange(
                address, get(path, address), b"", head_only=False, fresh=False
            )
            await whole(response)
            response.release()  # and the next request goes at once, in the same turn
        assert (connections.opened, len(accepted)) == (2, 2)
