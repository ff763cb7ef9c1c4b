"""One client connection on the proxy port: requests parsed by httptools, answered in order.

- **Pipelining.** Requests are parsed as they arrive and answered one at a time, in order; each
  runs in a task of its own, which is cancelled if the client goes (so that its slot guard
  releases it as abandoned). Past ``_QUEUE_LIMIT`` parsed and unanswered requests, or
  ``HIGH_WATER`` unread body bytes, the connection stops reading.
- **Timers** (``ClientConnections``' rules, as for aiohttp's server): the head of the first
  request must arrive within ``header_timeout`` of the connection's start (the TLS handshake is
  bounded by the same time, in ``server``), and that of each later request within as long of
  its first byte; between requests, a connection idle for ``keepalive_timeout`` is closed. A
  body's pace is the proxy's (``--client-body-timeout``).
- **Closing.** After an answer with ``Connection: close`` (asked for by the client, HTTP/1.0,
  shutdown), the connection closes once the answer has gone. After one to a request whose
  body was left unread, or a malformed one, it stops writing and reads and drops whatever
  still comes for ``_LINGER`` seconds instead, so that the client reads the answer before the
  close (closing with unread data would reset the connection).
- **Malformed requests** get 400 in llama.cpp's error shape and a log line, after the answers
  to the requests before them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import httptools
from multidict import CIMultiDict

from paddler.balancer import errors
from paddler.balancer.api_error import ApiError
from paddler.balancer.proxy.client_connections import ClientConnections
from paddler.balancer.proxy.client_exchange import Answer, ClientRequest, ClientStream, error_answer
from paddler.balancer.proxy.proxy_http.request import Request
from paddler.balancer.proxy.proxy_http.response import (
    CONTINUE,
    Stream,
    Writer,
    has_body,
    head,
    whole,
)
from paddler.balancer.proxy.upstream_http.response import Body

log = logging.getLogger(__name__)

Handle = Callable[[ClientRequest], Awaitable[Answer | None]]

_QUEUE_LIMIT = 16
_INTERNAL_ERROR = ApiError(500, "the balancer failed to answer the request", "server_error")
_LINGER = 2.0
_NAMES: dict[bytes, str] = {}
"""Header names seen, decoded once and shared by every request that sends them (each buffered
request holds its headers: six names of a typical client are 330 bytes a request otherwise)."""
_NAMES_KEPT = 512
"""At most this many names are kept (a client sending made-up names fills it, and then
nothing more is kept: the cost is decoding, as without it)."""


class Connection(asyncio.Protocol):
    """A client connection. ``busy``: a request is being answered or waits to be."""

    __slots__ = (
        "_closing",
        "_connections",
        "_deadline",
        "_handle",
        "_headers",
        "_heard",
        "_idle",
        "_keepalive_timeout",
        "_loop",
        "_malformed",
        "_on_closed",
        "_on_deadline",
        "_parser",
        "_parsing",
        "_paused_reading",
        "_queue",
        "_task",
        "_timer",
        "_timer_at",
        "_url",
        "_writer",
        "transport",
    )

    def __init__(
        self,
        handle: Handle,
        connections: ClientConnections,
        keepalive_timeout: float,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[Connection], None],
    ) -> None:
        self._handle = handle
        self._connections = connections
        self._keepalive_timeout = keepalive_timeout
        self._loop = loop
        self._on_closed = on_closed
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._parsing: Request | None = None
        self._queue: list[Request] = []
        """Pipelined requests, parsed while one is answered (a list: a deque allocates a
        760-byte block up front, and most connections never pipeline)."""
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._on_deadline: Callable[[], object] | None = None
        self._heard = False
        self._idle = False
        self._closing = False
        self._malformed: str | None = None
        self._paused_reading = False
        self._writer = Writer()
        self.transport: asyncio.Transport | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._queue)

    # -- the transport's calls
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's do not derive from it
        if not self._connections.admit(stream):
            self._on_closed(self)  # the refusal has the transport now
            return
        self.transport = stream
        self._arm(self._connections.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused over the cap: never counted
        self._connections.open -= 1
        self.transport = None
        self._stop_timer()
        self._writer.connection_lost()
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client is gone: so is its request
        self._on_closed(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._malformed is not None:
            return  # lingering, or past a request that could not be parsed: dropped
        if self._idle:
            # The first byte of the next request of a kept-alive connection.
            self._arm(self._connections.header_timeout, self._head_late)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrade is served: what was parsed is answered, and the connection closes.
            self._stop_parsing("")
        except httptools.HttpParserError as error:
            self._stop_parsing(str(error) or "malformed request")

    def eof_received(self) -> bool:
        # As aiohttp's server: the client's end closes the connection, and a request still
        # being answered is cancelled (a client that hung up is gone).
        return False

    def pause_writing(self) -> None:
        self._writer.pause()

    def resume_writing(self) -> None:
        self._writer.resume()

    # -- the parser's calls
    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers.clear()
        self._heard = True

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        text = _NAMES.get(name)
        if text is None:
            text = name.decode("latin-1")
            if len(_NAMES) < _NAMES_KEPT and len(name) <= 64:
                _NAMES[name] = text
        self._headers.append((text, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            b"".join(self._url).decode("latin-1"),
            CIMultiDict(self._headers),
            parser.get_http_version(),
            parser.should_keep_alive(),
            Body(self._body_drained, self._loop),
        )
        # Copied into the request: not kept by the connection while the request is answered
        # (or waits in the buffer, thousands at once).
        self._url.clear()
        self._headers.clear()
        self._parsing = request
        self._heard = False
        if self._task is None and not self._queue:
            self._disarm()  # the head arrived in time
            self._start(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= _QUEUE_LIMIT:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and request.content.feed(body):
            self._pause_reading()

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is not None:
            request.content.feed_eof()

    # -- answering
    def _start(self, request: Request) -> None:
        self._task = self._loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        transport = self.transport
        assert transport is not None
        keep_alive = request.keep_alive and not self._closing
        try:
            if request.expects_continue and not request.content.is_eof():
                transport.write(CONTINUE)
            try:
                answer = await self._handle(request)
            except Exception:
                log.exception("request %s %s failed in the balancer", request.method, request.path)
                answer = error_answer(_INTERNAL_ERROR)
            # A body left unread (refused before it was read) would be taken for the next
            # request: the connection closes after the answer.
            unread = not request.content.is_eof()
            keep_alive = keep_alive and not unread and not self._closing
            if answer is not None:
                keep_alive = keep_alive and not answer.close
                if not transport.is_closing():
                    transport.write(whole(answer, request.method, keep_alive))
            else:
                keep_alive = keep_alive and request.keep_alive
        finally:
            self._task = None
        self._answered(keep_alive, linger=unread)

    def stream(
        self,
        request: Request,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        content_length: int | None,
    ) -> ClientStream:
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        body = has_body(status, request.method)
        keep_alive = request.keep_alive and not self._closing
        chunked = False
        if content_length is not None:
            framing = f"Content-Length: {content_length}\r\n"
        elif not body:
            framing = ""
        elif request.version == "1.1":
            framing, chunked = "Transfer-Encoding: chunked\r\n", True
        else:
            framing, keep_alive = "", False  # HTTP/1.0: the close ends the body
        if not keep_alive:
            request.keep_alive = False
        return Stream(
            transport,
            self._writer,
            head(status, reason, headers, framing, keep_alive),
            body,
            chunked,
        )

    def _answered(self, keep_alive: bool, linger: bool) -> None:
        """The current request's answer has gone: the next one, a close (``linger``: with
        the client still sending), or the idle timer."""
        if self.transport is None:
            return
        if not keep_alive:
            self._close(linger)
            return
        if self._queue:
            self._start(self._queue.pop(0))
            if self._paused_reading and len(self._queue) < _QUEUE_LIMIT:
                self._resume_reading()
            return
        if self._malformed is not None:
            if self._malformed:
                self._refuse_malformed(self._malformed)
            else:
                self._close(linger=False)
            return
        if self._heard:  # part of the next head has arrived
            self._arm(self._connections.header_timeout, self._head_late)
        else:
            self._arm(self._keepalive_timeout, self._idle_too_long)
            self._idle = True

    def _stop_parsing(self, problem: str) -> None:
        """No more requests are read: answer those already parsed, then close (with a 400 for
        ``problem``, if there is one)."""
        self._disarm()
        if self._task is not None or self._queue:
            self._malformed = problem
            self._pause_reading()
            return
        if problem:
            self._refuse_malformed(problem)
        else:
            self._close(linger=False)

    def _refuse_malformed(self, problem: str) -> None:
        transport = self.transport
        if transport is None:
            return
        peer = transport.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "an unknown peer"
        log.info("reverseproxy port: a malformed request from %s: %s", where, problem[:200])
        answer = error_answer(errors.bad_request(f"malformed request: {problem[:200]}"))
        transport.write(whole(answer, "GET", keep_alive=False))
        self._close(linger=True)

    # -- closing
    def shut(self) -> None:
        """Shutdown: close now if idle, else after the answer in progress."""
        self._closing = True
        if self.transport is not None and not self.busy:
            self._close(linger=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self, linger: bool) -> None:
        """Close once what was written has gone; with ``linger``, stop writing instead, and
        read and drop what still comes for a moment (see the module docstring)."""
        transport = self.transport
        if transport is None:
            return
        self._closing = True
        self._queue.clear()
        self._disarm()
        if not linger:
            transport.close()
            return
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: close_notify, then the close
            return
        self._arm(_LINGER, transport.abort)

    def _head_late(self) -> None:
        if self.transport is not None:
            self._connections.head_late(self.transport, self._heard)

    def _idle_too_long(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- timers and flow
    #
    # One deadline at a time (the head's, the keep-alive's, the linger's), kept by one timer
    # that is moved only when the deadline comes sooner than it: a kept-alive connection's
    # requests re-arm the deadline twice each, and a timer made and cancelled each time cost
    # about 5 % of a small request. A timer that finds its deadline later re-arms itself then.
    def _arm(self, delay: float, callback: Callable[[], object]) -> None:
        self._idle = False
        deadline = self._loop.time() + delay
        self._deadline = deadline
        self._on_deadline = callback
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._set_timer(deadline)

    def _disarm(self) -> None:
        """No deadline: a timer still set finds nothing to do when it fires."""
        self._idle = False
        self._on_deadline = None

    def _stop_timer(self) -> None:
        """The connection is done with: nothing of it waits on the loop's clock."""
        self._on_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set_timer(self, at: float) -> None:
        self._timer = self._loop.call_at(at, self._timer_fired)
        self._timer_at = at

    def _timer_fired(self) -> None:
        self._timer = None
        callback = self._on_deadline
        if callback is None:
            return
        if self._loop.time() < self._deadline:  # moved on since the timer was set
            self._set_timer(self._deadline)
            return
        self._on_deadline = None
        callback()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()

    def _body_drained(self) -> None:
        if len(self._queue) < _QUEUE_LIMIT and self._malformed is None:
            self._resume_reading()
