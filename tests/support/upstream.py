"""Fake llama.cpp servers, only for faults the real one cannot produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def llamacpp_self_description(app: web.Application, total_slots: int) -> None:
    """Answer ``GET /health`` and ``GET /props`` as llama.cpp does, which is what the balancer
    asks before it counts a server (see ``paddler.balancer.management.agent_verifier``)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(request: web.Request) -> web.Response:
        return web.json_response({"total_slots": total_slots, "model_alias": "fake"})

    app.router.add_get("/health", health)
    app.router.add_get("/props", props)


@contextlib.asynccontextmanager
async def fake_upstream(
    handler: Handler, total_slots: int | None = 64, client_max_size: int = 1024**2
) -> AsyncIterator[int]:
    """Serve ``handler`` on a free port, for every route but llama.cpp's ``/health`` and
    ``/props`` (``total_slots`` slots; with None, ``handler`` serves those too); yield the port."""
    app = web.Application(client_max_size=client_max_size)
    if total_slots is not None:
        llamacpp_self_description(app, total_slots)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def not_found(request: web.Request) -> web.Response:
    return web.json_response({"error": {"code": 404, "message": "File Not Found"}}, status=404)


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
                if head.startswith((b"GET /health ", b"GET /props ")):
                    # The balancer checking the server before counting it, on a connection of
                    # its own: llama.cpp's answer, and nothing counted.
                    body = b'{"status":"ok","total_slots":64}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                    )
                    await writer.drain()
                    continue
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
