"""Closed-loop event streams that time the first event: what a proxy adds to TTFT.

wrk sees a response only once it is complete, so the time to the first event of a stream is
measured here, on raw asyncio streams rather than aiohttp's client, so that the client adds as
little of its own time as it can (its CPU is reported per cell: at 64 streams under a quarter of
a core). Each of ``streams`` loops: send the
request, read the head, time the first chunk that carries ``data:``, read to the last chunk,
and send the next. The streams start spread over one stream's length, so that they do not
arrive in lockstep.

A stream's connection is kept when the other side keeps it: a proxy does; the fast upstream,
like llama.cpp, closes it after every stream. A kept connection found closed before any byte
of the answer came back is opened anew and the request sent again (timed from the resend), as
nginx and Paddler do upstream. Requests that start during the warm-up are not counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class StreamsResult:
    ttfts: list[float] = field(default_factory=list)
    """Seconds from sending a request to its first event, for the counted requests."""
    requests: int = 0
    events: int = 0
    errors: int = 0
    resent: int = 0
    examples: list[str] = field(default_factory=list)


CAP_MARGIN = 30.0


class _Closed(Exception):
    """The kept connection was closed before any byte of the answer."""


async def paced_streams(
    url: str,
    path: str,
    body: dict[str, Any],
    *,
    streams: int,
    seconds: float,
    warmup: float,
    spread: float,
) -> StreamsResult:
    """Run ``streams`` closed-loop streams for ``warmup`` + ``seconds``; ``spread``: a stream's
    expected length, over which their starts are spread."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = json.dumps(body, separators=(",", ":")).encode()
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, len(payload), payload)
    )
    result = StreamsResult()
    start = time.perf_counter()
    counted_from, deadline = start + warmup, start + warmup + seconds

    async def stream() -> None:
        await asyncio.sleep(random.uniform(0, spread))
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while time.perf_counter() < deadline:
                sent_at = time.perf_counter()
                try:
                    if connection is None or connection[0].at_eof():
                        connection = await _connect(host, port, connection)
                    try:
                        ttft, events, kept = await _exchange(*connection, request)
                    except _Closed:
                        result.resent += 1
                        connection = await _connect(host, port, connection)
                        sent_at = time.perf_counter()
                        ttft, events, kept = await _exchange(*connection, request)
                except (OSError, asyncio.IncompleteReadError, ValueError, _Closed) as error:
                    result.errors += 1
                    if len(result.examples) < 5:
                        result.examples.append(repr(error))
                    if connection is not None:
                        connection[1].close()
                    connection = None
                    await asyncio.sleep(0.01)
                    continue
                if sent_at >= counted_from:
                    result.requests += 1
                    result.events += events
                    result.ttfts.append(ttft - sent_at)
                if not kept:
                    connection[1].close()
                    connection = None
        finally:
            if connection is not None:
                connection[1].close()

    try:
        # A proxy that stops answering must not hold the benchmark: the cell has a cap.
        async with asyncio.timeout(warmup + seconds + spread + CAP_MARGIN):
            await asyncio.gather(*(stream() for _ in range(streams)))
    except TimeoutError:
        result.errors += 1
        result.examples.append(f"streams still running {CAP_MARGIN:g}s after the cell's end")
    return result


async def _connect(
    host: str, port: int, previous: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if previous is not None:
        previous[1].close()
    return await asyncio.open_connection(host, port)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, int, bool]:
    """Send ``request``, read its event stream; return when the first event came, how many
    events came, and whether the connection may be used again."""
    writer.write(request)
    try:
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        if isinstance(error, asyncio.IncompleteReadError) and error.partial:
            raise
        raise _Closed from error
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise ValueError(f"answer {status_line!r}")
    first = 0.0
    events = 0
    while size := int((await reader.readline()).strip() or b"0", 16):
        data = await reader.readexactly(size + 2)
        if not first and b"data:" in data:
            first = time.perf_counter()
        events += data.count(b"data:")
    await reader.readline()
    return first, events, b"connection: close" not in head.lower()
