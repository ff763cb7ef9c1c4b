"""Fake llama.cpp servers, only for faults the real one cannot produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def fake_upstream(handler: Handler, client_max_size: int = 1024**2) -> AsyncIterator[int]:
    """Serve ``handler`` for every route on a free port; yield the port."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def closing_keepalive_upstream() -> AsyncIterator[tuple[int, dict[str, int]]]:
    """An HTTP/1.1 server that promises keep-alive, then drops the connection on its next use.

    This is llama.cpp at the edge of its keep-alive window, made certain: the response says
    nothing of closing and the connection stays open, but a second request on it is met with a
    close, before any response byte. Yields the port and counts of requests answered and dropped.
    """
    counts = {"answered": 0, "dropped": 0}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if answered_here == 1:
                    counts["dropped"] += 1
                    return  # the keep-alive window just ended
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                answered_here += 1
                counts["answered"] += 1
                body = b'{"ok":true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Keep-Alive: timeout=5, max=100\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), counts
    finally:
        server.close()
        await server.wait_closed()
