"""A response from a llama.cpp server, as the proxy reads it: its head, and its body as it arrives.

``UpstreamResponse`` and ``ResponseBody`` are the few members of aiohttp's ``ClientResponse``
and ``StreamReader`` that the proxy uses (``paddler.balancer.proxy.upstream``); ``Response`` and
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


class SinkFailed(Exception):
    """The sink a body was piped to raised ``error`` (``Body.piped``)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class Body:
    """The body of one response, fed by its connection; read by one reader at a time.

    ``is_eof``: the whole body has arrived (some of it may be unread). A set exception fails
    the pending read and every later one, even with bytes still unread: it means the server is
    gone or silent, and what is unread will not be completed.

    ``pipe``: while nothing is unread, the reader may have each piece that arrives handed to a
    sink at once, in the connection's ``data_received``, instead of being woken for it. A
    relayed stream's chunk then costs no future, no wake-up of the relaying task and no
    resumption of its coroutines: 24.5 k instructions a chunk before, 12.3 k with it
    (``python -m bench.profile_proxy instructions --what chunks``).
    """

    __slots__ = (
        "_buffered",
        "_eof",
        "_exception",
        "_loop",
        "_parts",
        "_resume",
        "_sink",
        "_sink_failure",
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
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_failure: BaseException | None = None
        self.total_bytes = 0
        """Every body byte received so far, read or not (``SlotGuard.received``)."""

    # -- from the connection
    def feed(self, data: bytes) -> bool:
        """Add bytes; whether the unread ones are past ``HIGH_WATER`` (time to stop reading)."""
        self.total_bytes += len(data)
        sink = self._sink
        if sink is not None:
            try:
                if sink(data):
                    return False
            except Exception as error:  # the reader's to hear; the bytes go with it
                self._sink = None
                self._sink_failure = error
                self._wake()
                return False
            self._sink = None  # refused: unread from here on, for the reader to take
        self._parts.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered > HIGH_WATER

    def feed_eof(self) -> None:
        self._eof = True
        self._sink = None
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._exception is None and not (self._eof and not self._parts):
            self._exception = exc
            self._sink = None
            self._wake()

    # -- for a reader that relays
    def pipe(self, sink: Callable[[bytes], bool]) -> bool:
        """Hand each piece that arrives from now on to ``sink`` as it arrives, until it
        returns False (that piece and the later ones are then unread, as without a sink),
        raises, or the body ends or fails; ``piped`` waits for that. False, and nothing
        piped, if anything is unread, or the body has ended or failed."""
        if self._parts or self._eof or self._exception is not None:
            return False
        self._sink = sink
        return True

    async def piped(self) -> None:
        """Wait while the pipe runs. Returns once it stopped because the body ended or the
        sink refused a piece (``readany`` goes on from there); raises the body's exception,
        or ``SinkFailed`` with the sink's."""
        try:
            while self._sink is not None:
                self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
                await self._waiter
        finally:
            self._sink = None
        failure = self._sink_failure
        if failure is not None:
            self._sink_failure = None
            raise SinkFailed(failure) from failure
        if self._exception is not None:
            raise self._exception

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
