"""One HTTP/1.1 connection to a llama.cpp server: a request at a time, its response parsed by
httptools as it arrives.

Timing: the read timeout runs from the end of the request to the response's head, then between
packets of its body; it stops while the body's reader is ``HIGH_WATER`` behind (a slow client
pauses reading from the server, and a server held back is not silent). One timer per response,
re-armed only when it fires: a packet costs a clock read, not a timer, and a kept-alive
connection's next response takes the timer its last one left.

Keep-alive: a connection may carry another request only after a whole response that did not
say ``Connection: close`` (llama.cpp says it on its 100th response) and was not an event stream
(llama.cpp closes those connections after the stream, whatever its head said).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from paddler.balancer.proxy.upstream_http.failures import BodyBroken, Disconnected, ReadTimeout
from paddler.balancer.proxy.upstream_http.response import Body, Response
from paddler.config import Address

_PIECE_BYTES = 256 * 1024
"""A large request body goes out in pieces of this size, each once the last has drained, so that
the loop does not copy it whole (30 MB: 15-20 ms) and other requests' chunks flow between."""

_WHOLE_BYTES = 1024 * 1024

_NAMES: dict[bytes, str] = {}
"""Header names seen, decoded once: llama.cpp sends the same eight with every response."""
_NAMES_KEPT = 256
"""At most this many, of at most 64 bytes, are kept; a server sending made-up names costs
their decoding, as without the cache."""


class Connection(asyncio.Protocol):
    """A connection and the response it is reading. ``idle_since``: when it last went idle."""

    # An open stream holds one: slots keep it small (issue 10 counts the memory per stream).
    __slots__ = (
        "_body",
        "_done",
        "_drained",
        "_framed",
        "_head",
        "_head_only",
        "_headers",
        "_idle",
        "_last_read",
        "_loop",
        "_on_idle",
        "_on_lost",
        "_on_spent",
        "_parser",
        "_paused",
        "_read_timeout",
        "_reason",
        "_reusable",
        "_spent_soon",
        "_stream",
        "_timer",
        "address",
        "closed",
        "idle_since",
        "transport",
    )

    def __init__(
        self,
        address: Address,
        read_timeout: float | None,
        on_idle: Callable[[Connection], None],
        on_lost: Callable[[Connection], None],
        on_spent: Callable[[Connection], None],
    ) -> None:
        """``on_idle``: a response was done with and the connection may carry another request;
        ``on_lost``: the connection closed; ``on_spent``: the head of a response after which
        the connection carries no other (an event stream, or ``Connection: close``) has
        arrived (called soon after, once the reader has had it), and again when its last bytes
        have (at once, before its reader sees them)."""
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._on_idle = on_idle
        self._on_lost = on_lost
        self._on_spent = on_spent
        self._idle = False
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._head: asyncio.Future[Response] | None = None
        self._body: Body | None = None
        self._headers: list[tuple[str, str]] = []
        self._reason: str | None = None
        self._framed = False  # the body's end is known from its head, not from a close
        self._done = True
        self._reusable = False
        self._spent_soon = False
        self._stream = False
        self._head_only = False
        self._paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each chunk of a stream goes out at once, not after the previous one's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._idle:
            self.close()  # nothing was asked: whatever the server says makes no sense
            return
        if self._read_timeout is not None:
            self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._broken(f"malformed response: {error!r}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self._done:
            if self._body is not None and not self._framed:
                self._body.feed_eof()  # a body that ends with its connection (no length given)
                self._done = True
            else:
                self._broken(f"the server closed the connection: {exc!r}")
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- the exchange
    async def exchange(self, head: bytes, body: bytes, head_only: bool) -> Response:
        """Send a request; return its response once its head arrived. ``head_only``: the
        request was a HEAD, whose response has no body whatever its head says.

        Raises ``Disconnected``, ``BodyBroken`` or ``ReadTimeout``; the connection is closed on
        any failure and on cancellation (the server must see the request go)."""
        transport = self.transport
        assert transport is not None and self._done, "one exchange at a time"
        self._done = False
        self._idle = False
        self._reusable = False
        self._body = None
        self._head_only = head_only
        head_future: asyncio.Future[Response] = self._loop.create_future()
        self._head = head_future
        try:
            if self.closing:
                raise Disconnected("the server closed the connection before the request")
            if len(body) <= _WHOLE_BYTES:
                transport.write(head + body)
            else:
                transport.write(head)
                view = memoryview(body)
                for start in range(0, len(view), _PIECE_BYTES):
                    await self._drain()
                    transport.write(view[start : start + _PIECE_BYTES])
                await self._drain()
            self._start_timer()
            return await head_future
        except BaseException:
            self.close()
            if head_future.done() and not head_future.cancelled():
                head_future.exception()  # told by the exception raised here instead
            raise
        finally:
            self._head = None

    async def _drain(self) -> None:
        if self._drained is not None:
            await self._drained
        if self.closed:
            raise Disconnected("the server closed the connection while the request was sent")

    def park(self) -> None:
        """A connection opened ahead of a request: idle until one takes it."""
        self._idle = True
        self.idle_since = self._loop.time()
        self._on_idle(self)

    def _release(self) -> None:
        """The response is done with: the connection goes idle if it may carry another request,
        and is closed otherwise."""
        if not (self._done and self._reusable and not self.closed):
            self.close()
            return
        self._body = None
        self._idle = True
        self.idle_since = self._loop.time()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._on_idle(self)

    @property
    def closing(self) -> bool:
        return self.closed or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _broken(self, message: str) -> None:
        pending = self._head is not None and not self._head.done()
        self._fail(Disconnected(message) if pending else BodyBroken(message))

    def _fail(self, error: BaseException) -> None:
        self._stop_timer()
        self._done = True
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._body is not None:
            self._body.set_exception(error)

    # -- the read timeout
    def _start_timer(self) -> None:
        if self._read_timeout is not None and not self._done:
            self._last_read = self._loop.time()
            if self._timer is None:  # one left by the last response fires sooner, and moves
                self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._expire)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        assert self._read_timeout is not None
        self._timer = None
        if self._done or self._paused:
            return  # resume_reading starts it again
        deadline = self._last_read + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._fail(ReadTimeout(f"no byte for {self._read_timeout:g}s"))
        self.close()

    def _resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            if self._timer is None:
                self._start_timer()

    # -- httptools.HttpResponseParser's callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = None

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them: the bytes survive the way back out.
        text = _NAMES.get(name)
        if text is None:
            text = name.decode("utf-8", "surrogateescape")
            if len(_NAMES) < _NAMES_KEPT and len(name) <= 64:
                _NAMES[name] = text
        self._headers.append((text, value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser.get_status_code() < 200:
            return  # 1xx: an interim answer (none is asked for: no Expect goes out)
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        self._body = body = Body(self._resume_reading, self._loop)
        response = Response(
            parser.get_status_code(), self._reason, headers, body, self._release, self.close
        )
        self._framed = "Content-Length" in headers or "Transfer-Encoding" in headers
        self._stream = response.content_type == "text/event-stream"
        self._reusable = (
            parser.should_keep_alive() and self._framed and not self._head_only and not self._stream
        )
        if self._head_only or response.status in (204, 304):
            self._done = True  # its timer, if it fires, finds the response done
            body.feed_eof()
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        if not self._reusable:
            # After the relay's next step, which writes the head and the first chunk: opening
            # a connection (a task, a socket) is not on the way to the first token.
            self._spent_soon = True
            self._loop.call_soon(self._spent_now)

    def _spent_now(self) -> None:
        if self._spent_soon:
            self._spent_soon = False
            self._on_spent(self)

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None and body.feed(data) and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._done or self._body is None:
            return  # a HEAD's, whose end was told with its head; or a 1xx's
        self._done = True  # the timer is left: the next response moves it, a close stops it
        if not self._reusable:
            # Again (the one opened at its head may have been forgotten), or for the first
            # time if the head's call has not come yet (the whole answer came with its head).
            self._spent_soon = False
            self._on_spent(self)
        self._body.feed_eof()
