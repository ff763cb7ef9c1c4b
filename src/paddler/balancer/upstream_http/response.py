"""A response from a llama.cpp server, as the proxy reads it: its head, and its body as it arrives.

``UpstreamResponse`` and ``ResponseBody`` are the few members of aiohttp's ``ClientResponse``
and ``StreamReader`` that the proxy uses (``paddler.balancer.upstream``); ``Response`` and
``Body`` are the hand-written client's (``connection``), so that either client's response goes
through the same ``relay``, ``hold`` and ``interrupt``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDictProxy

HIGH_WATER = 64 * 1024
"""Body bytes held unread before the connection stops reading: a client slower than its server
holds the server back (TCP's own flow control from there on), not the balancer's memory."""


class ResponseBody(Protocol):
    @property
    def total_bytes(self) -> int: ...

    async def readany(self) -> bytes: ...

    async def read(self, n: int = -1) -> bytes: ...

    def read_nowait(self, n: int = -1) -> bytes: ...

    def is_eof(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def set_exception(self, exc: BaseException) -> None: ...


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> ResponseBody: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content_type(self) -> str: ...

    def release(self) -> object: ...

    def close(self) -> None: ...


class Body:
    """The body of one response, fed by its connection; read by one reader at a time.

    ``is_eof``: the whole body has arrived (some of it may be unread). A set exception fails
    the pending read and every later one, even with bytes still unread: it means the server is
    gone or silent, and what is unread will not be completed.
    """

    __slots__ = (
        "_buffered",
        "_eof",
        "_exception",
        "_loop",
        "_parts",
        "_resume",
        "_waiter",
        "total_bytes",
    )

    def __init__(
        self, resume: Callable[[], None], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """``loop``: the connection's (else the running one when a read waits: Python 3.11
        looks the running loop up with a getpid system call, which a body that waits for each
        chunk would pay per chunk)."""
        self._loop = loop
        self._parts: list[bytes] = []
        """Unread pieces, in order (a list: a deque allocates a 760-byte block at once, and
        a body is kept by each of thousands of buffered requests)."""
        self._buffered = 0
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._resume = resume
        self.total_bytes = 0
        """Every body byte received so far, read or not (``SlotGuard.received``)."""

    # -- from the connection
    def feed(self, data: bytes) -> bool:
        """Add bytes; whether the unread ones are past ``HIGH_WATER`` (time to stop reading)."""
        self._parts.append(data)
        self._buffered += len(data)
        self.total_bytes += len(data)
        self._wake()
        return self._buffered > HIGH_WATER

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._exception is None and not (self._eof and not self._parts):
            self._exception = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- for the reader
    def exception(self) -> BaseException | None:
        return self._exception

    def is_eof(self) -> bool:
        return self._eof

    async def readany(self) -> bytes:
        """Every byte that has arrived and is unread, waiting for some if none has; b"" at
        the end. (``_ready``'s loop, inline: this is awaited for each relayed chunk.)"""
        while True:
            if self._exception is not None:
                raise self._exception
            if self._parts or self._eof:
                return self.read_nowait()
            self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
            await self._waiter

    async def read(self, n: int = -1) -> bytes:
        """At most ``n`` bytes (all there are, with -1), as ``readany``."""
        await self._ready()
        return self.read_nowait(n)

    def read_nowait(self, n: int = -1) -> bytes:
        parts = self._parts
        if not parts:
            return b""
        if len(parts) == 1:
            data = parts.pop()
        else:
            data = b"".join(parts)
            parts.clear()
        if 0 <= n < len(data):
            parts.append(data[n:])  # parts is empty: this is its head again
            data = data[:n]
        before = self._buffered
        self._buffered -= len(data)
        if before > HIGH_WATER >= self._buffered:
            self._resume()
        return data

    async def _ready(self) -> None:
        while True:
            if self._exception is not None:
                raise self._exception
            if self._parts or self._eof:
                return
            self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
            await self._waiter


class Response:
    """The head of a response, its body, and what becomes of its connection afterwards."""

    __slots__ = (
        "_close",
        "_release",
        "content",
        "content_length",
        "content_type",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDictProxy[str],
        content: Body,
        release: Callable[[], None],
        close: Callable[[], None],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        raw_type = headers.get("Content-Type")
        self.content_type = (
            "application/octet-stream"  # as aiohttp reports it (RFC 9110 section 8.3)
            if raw_type is None
            else raw_type.partition(";")[0].strip().lower()
        )
        """The media type, lowercased, without parameters (read once per response or more)."""
        self._release = release
        self._close = close

    def release(self) -> None:
        """Done with it: its connection goes back to the pool if the whole body arrived and
        the server keeps the connection open; otherwise it is closed."""
        self._release()

    def close(self) -> None:
        """Drop the connection: the server sees the request end (llama.cpp stops generating)."""
        self._close()
