"""What a client connection may cost the balancer: a deadline for each request head, and a cap.

aiohttp (3.14) bounds neither. Its only timer is ``keepalive_timeout``, which runs from the
connection's start or the end of the last response until a whole head has been parsed, so a
client that trickles one header byte now and then holds a connection (and a file descriptor) for
as long as that timer, and nothing limits how many it opens. This module adds, around aiohttp's
own ``RequestHandler`` and without changing what it does:

- **The head deadline.** The whole request head must arrive within ``header_timeout`` of the
  connection's start (after the TLS handshake, which ``ssl_handshake_timeout`` bounds by the same
  figure), or, on a kept-alive connection, of the first byte of the next request. Otherwise the
  connection is closed without an answer, as nginx and Go's ``ReadHeaderTimeout`` do: on an idle
  keep-alive connection a late answer could be read as the reply to a request the client is just
  sending. A connection that sends nothing is closed at the same deadline. The head counts as
  arrived when aiohttp hands the request to the application (the ``middleware``, which both
  ports install); it counts as done when the handler returns, so that a long stream, or an
  agent's WebSocket after its upgrade, is never cut. Between requests, idle keep-alive
  connections are aiohttp's: ``keepalive_timeout``.
- **The cap.** Past ``max_connections`` open connections, a new one is answered a canned
  ``503`` in the OpenAI error shape with ``Connection: close`` and closed, without a request
  handler or parser ever being built for it, so that the balancer's memory does not grow with the
  number of connections a client opens. It reads (and drops) what the client sends for a moment,
  so that closing with unread data does not reset the connection before the client has read the
  answer.

Each closing is logged: the first of a kind at once, the others counted in one line per
``_LOG_WINDOW`` seconds, so that a slowloris of thousands of connections does not flood the log.

Hand-written because no library offers a head deadline for aiohttp, and a wrapper is the least
code that adds one without forking aiohttp's protocol. Its cost per request is one timer armed
and cancelled and one middleware frame: ``python -m bench.client_connections overhead`` (16
kept-alive clients through the proxy to a fake upstream that answers at once, 8 s, 2 shared
cores) measured 341 and 344 µs of balancer CPU per request with it, 345 and 351 µs with plain
``web.TCPSite``; requests/s (1,600 to 2,600 either way) vary more between runs than between
builds. The cost is below the noise, under 2%.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

_LOG_WINDOW = 10.0
_REFUSAL_LINGER = 1.0
_MAX_LINGERING_REFUSALS = 256
"""Past this many refused connections still reading, new ones are closed at once: a flood of
connections over the cap must not hold file descriptors for the linger as well."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _canned_503(max_connections: int, why: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": 503,
                "message": f"the balancer already has {max_connections} connections open on "
                f"this port ({why}); retry shortly",
                "type": "unavailable_error",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ClientConnections:
    """The connections of one port: how many are open, and the rules each one lives by.

    ``max_connections=None``: no cap. ``cap_reason`` names what sets the cap, for the 503.
    """

    def __init__(
        self,
        port_name: str,
        header_timeout: float,
        max_connections: int | None = None,
        cap_reason: str = "--max-client-connections",
    ) -> None:
        self.port_name = port_name
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self.head_timeouts = 0
        self._lingering_refusals = 0
        self._refusal = (
            _canned_503(max_connections, cap_reason) if max_connections is not None else b""
        )
        self._guards: dict[RequestHandler, _Guard] = {}
        self._unlogged: dict[str, int] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tell the connection's guard that its head arrived, and when the handler is done."""
        guard = self._guards.get(request.protocol)
        if guard is None:  # an app served some other way (a test client)
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_ended()

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """Called on the loop that will serve the port; each guard keeps that loop, so that
        arming a timer per request does not look it up (in Python 3.11 each look-up is a
        getpid system call)."""
        loop = asyncio.get_running_loop()

        def make() -> asyncio.Protocol:
            return _Guard(self, server, loop)

        return make

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection in, or (past the cap) hand it the canned 503 and False."""
        cap = self.max_connections
        if cap is not None and self.open >= cap:
            refusal = _Refusal(self)
            transport.set_protocol(refusal)
            refusal.connection_made(transport)
            return False
        self.open += 1
        return True

    def head_late(self, transport: asyncio.Transport, heard: bool) -> None:
        """Close a connection whose request head did not arrive within ``header_timeout``
        (``heard``: some of it did), with its log line."""
        self.head_timeouts += 1
        what = "a partial request head" if heard else "nothing"
        self._closed(
            "closed for a late request head",
            f"closed a connection from {_peer(transport)} that sent {what} within "
            f"{self.header_timeout:g}s (--client-header-timeout)",
        )
        # Abort, not close: there is nothing to flush that the client is waiting for, and a
        # client that does not read would hold a closing transport open.
        transport.abort()

    def _closed(self, kind: str, detail: str) -> None:
        """Log a closing: the first of its kind in a window at once, the rest summed after it."""
        pending = self._unlogged.get(kind)
        if pending is None:
            log.info("%s port: %s", self.port_name, detail)
            self._unlogged[kind] = 0
            asyncio.get_running_loop().call_later(_LOG_WINDOW, self._flush, kind)
        else:
            self._unlogged[kind] = pending + 1

    def _flush(self, kind: str) -> None:
        count = self._unlogged.pop(kind, 0)
        if count:
            log.info(
                "%s port: %d more connection(s) %s in the last %.0fs",
                self.port_name,
                count,
                kind,
                _LOG_WINDOW,
            )


class _Guard(asyncio.Protocol):
    """Stands between the transport and aiohttp's handler; passes every call through."""

    __slots__ = (
        "_connections",
        "_heard",
        "_in_request",
        "_inner",
        "_loop",
        "_server",
        "_timer",
        "_transport",
    )
    _inner: RequestHandler  # built in connection_made, and only under the cap

    def __init__(
        self,
        connections: ClientConnections,
        server: web.Server,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._connections = connections
        self._server = server
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._heard = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self._connections
        transport = _stream(transport)
        if not connections.admit(transport):
            return
        self._inner = self._server()
        connections._guards[self._inner] = self
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        connections = self._connections
        connections.open -= 1
        connections._guards.pop(self._inner, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and not self._in_request:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self._heard = True
        self._inner.data_received(data)

    def eof_received(self) -> None:
        # aiohttp's returns nothing: the transport closes its side, and the handler finishes
        # the request it is on.
        self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self) -> None:
        self._in_request = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self) -> None:
        self._in_request = False
        self._heard = False

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._connections.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        self._connections.head_late(transport, self._heard)


class _Refusal(asyncio.Protocol):
    """A connection over the cap: the canned 503, then a short read of whatever arrives."""

    def __init__(self, connections: ClientConnections) -> None:
        self._connections = connections
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = _stream(transport)
        connections = self._connections
        connections.refused += 1
        connections._closed(
            "refused over the cap",
            f"refused a connection from {_peer(transport)} with 503: "
            f"{connections.max_connections} are open (--max-client-connections)",
        )
        transport.write(connections._refusal)
        if connections._lingering_refusals >= _MAX_LINGERING_REFUSALS:
            transport.close()
            return
        connections._lingering_refusals += 1
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # read and dropped: unread data would turn the close into a reset

    def eof_received(self) -> bool:
        return False  # the client read the answer and closed: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._connections._lingering_refusals -= 1


def _stream(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A stream server's transport, as what it is. Not checked with ``isinstance``: uvloop's
    transports have every method of ``asyncio.Transport`` without deriving from it."""
    return cast(asyncio.Transport, transport)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "an unknown peer"


class ClientConnectionsSite(web.BaseSite):
    """A TCP site of ``runner`` whose connections live by ``connections``' rules.

    Registered with the runner like aiohttp's ``TCPSite``, so ``runner.addresses`` reports the
    bound port and ``runner.cleanup()`` stops accepting before it drains.
    """

    __slots__ = ("_connections", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        connections: ClientConnections,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port``: share the port with other processes (SO_REUSEPORT), each of which
        the kernel hands a share of the new connections (``--workers``)."""
        # A burst of connections (clients arriving while a fleet scales from zero) must queue
        # in the kernel, not be dropped there: aiohttp's backlog of 128 made the kernel drop
        # 2,564 of a burst of 10,000 (issue 10's benchmark), each client then retrying after
        # a second. The kernel caps it at net.core.somaxconn.
        backlog = max(128, min(connections.max_connections or 128, 65535))
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._connections = connections
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        tls = self._ssl_context is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            # An unfinished handshake must not hold a connection longer than a late head can.
            ssl_handshake_timeout=self._connections.header_timeout if tls else None,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )
