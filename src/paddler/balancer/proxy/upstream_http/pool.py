"""Kept-alive connections to the llama.cpp servers, per server address.

A request takes the most recently idled connection to its server, or opens one (bounded by the
connect timeout). An idle connection is forgotten (closed) once it has been idle for
``keepalive_timeout``, before llama.cpp's own 5 s would close it under a request; one that the
server closes while idle leaves the pool at once.

llama.cpp closes a connection after each event stream (and after its 100th response), so the
next stream to that server would wait for a connection to open: at 1 stream, about 0.1 ms of
its time to first token, the handshake and three turns of the loop. So as soon as the head of
such a response arrives (and again as its last bytes are parsed, in case that one has been
forgotten since), one connection to that server is opened in the background and parked idle,
unless one is idle there already or being opened. A request that finds none idle while one
is being opened takes that one rather than opening another, so that it never pays the
handshake twice. The connection is opened after the head is relayed, and while the stream
runs, not in the moment between a stream's end and the client's next request, when the
client is waiting. At most one such connection per server is idle at a time; it is
forgotten after ``keepalive_timeout`` like any other, and a server that cannot be reached
costs only the failed attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable

from multidict import CIMultiDict

from paddler.balancer.proxy.upstream_http.connection import Connection
from paddler.balancer.proxy.upstream_http.failures import ConnectFailed
from paddler.balancer.proxy.upstream_http.response import Response
from paddler.config import Address

# Never forwarded as they came: the body is complete (no 100-continue to wait for) and framed
# by its Content-Length here.
log = logging.getLogger(__name__)

_NOT_SENT = frozenset({"expect", "content-length", "transfer-encoding"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_head(method: str, target: str, headers: CIMultiDict[str], body_length: int) -> bytes:
    """The request line and headers, with the body's Content-Length (when it has one, or the
    method expects one)."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in headers.items():
        if name.lower() not in _NOT_SENT:
            lines.append(f"{name}: {value}\r\n")
    if body_length or method in _BODY_METHODS:
        lines.append(f"Content-Length: {body_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class ConnectionPool:
    """Every connection of the balancer to llama.cpp servers; one per process."""

    def __init__(
        self, *, connect_timeout: float, keepalive_timeout: float, read_timeout: float | None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._connect_timeout = connect_timeout
        self._keepalive_timeout = keepalive_timeout
        self._read_timeout = read_timeout
        self._idle: dict[Address, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None
        self._warming: dict[Address, asyncio.Task[Connection]] = {}
        """Connections being opened ahead, one per server at most, until a request claims one
        or it is parked idle."""
        self._closed = False
        self.opened = 0
        """Connections opened so far."""

    def exchange(
        self, address: Address, head: bytes, body: bytes, *, head_only: bool, fresh: bool
    ) -> Awaitable[Response]:
        """Send a request to ``address``, on a connection opened for it if ``fresh``; return
        the response once its head arrived (see ``Connection.exchange``). Raises
        ``ConnectFailed`` if no connection could be opened.

        Not a coroutine itself when a connection is idle (nearly every request): it returns
        the connection's, a frame fewer to make and to resume."""
        connection = None if fresh else self._take(address)
        if connection is not None:
            return connection.exchange(head, body, head_only)
        return self._exchange_opened(address, head, body, head_only, fresh)

    async def _exchange_opened(
        self, address: Address, head: bytes, body: bytes, head_only: bool, fresh: bool
    ) -> Response:
        warming = None if fresh else self._warming.pop(address, None)
        if warming is None:
            connection = await self._connect(address)
        else:
            connection = await self._claim(warming)
        return await connection.exchange(head, body, head_only)

    def close(self) -> None:
        """Close every connection, idle or busy."""
        self._closed = True
        for warming in list(self._warming.values()):
            warming.cancel()
        self._warming.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._open):
            connection.close()
        self._idle.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _take(self, address: Address) -> Connection | None:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()  # the most recently idled: the least likely to be stale
            if connection.closing:
                continue  # the server closed it; its connection_lost is on its way
            if self._loop.time() - connection.idle_since >= self._keepalive_timeout:
                # The sweep has not come yet; this one and every older one are stale.
                for stale in (*idle, connection):
                    stale.close()
                idle.clear()
                return None
            return connection
        return None

    @staticmethod
    async def _claim(warming: asyncio.Task[Connection]) -> Connection:
        """The connection being opened ahead, for a request; its failure to open is the
        request's (as if it had opened it itself)."""
        try:
            return await warming
        except asyncio.CancelledError:
            if warming.done() and not warming.cancelled() and warming.exception() is None:
                warming.result().close()  # opened as the request went
            raise

    async def _connect(self, address: Address) -> Connection:
        def connection() -> Connection:
            return Connection(address, self._read_timeout, self._idled, self._lost, self._spent)

        try:
            async with asyncio.timeout(self._connect_timeout):
                _, opened = await self._loop.create_connection(
                    connection,
                    address.host,
                    address.port,
                    ssl=self._tls_context() if address.scheme == "https" else None,
                )
        except TimeoutError as error:
            raise ConnectFailed(
                f"cannot connect to {address.authority} within {self._connect_timeout:g}s"
            ) from error
        except OSError as error:
            raise ConnectFailed(f"cannot connect to {address.authority}: {error}") from error
        self._open.add(opened)
        self.opened += 1
        return opened

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _idled(self, connection: Connection) -> None:
        self._idle.setdefault(connection.address, []).append(connection)
        if self._sweep is None:
            self._sweep = self._loop.call_at(
                connection.idle_since + self._keepalive_timeout, self._forget_stale
            )

    def _lost(self, connection: Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.address)
        if idle is not None and connection in idle:
            idle.remove(connection)

    def _spent(self, connection: Connection) -> None:
        """Open a connection to its server ahead of the next request (see the docstring)."""
        address = connection.address
        if self._closed or self._idle.get(address) or address in self._warming:
            return
        warming = self._loop.create_task(self._connect(address))
        self._warming[address] = warming
        warming.add_done_callback(functools.partial(self._warmed, address))

    def _warmed(self, address: Address, warming: asyncio.Task[Connection]) -> None:
        """Park the connection opened ahead, unless a request claimed it."""
        if self._warming.get(address) is not warming:
            return  # claimed: the request has its result, or its failure
        del self._warming[address]
        if warming.cancelled():
            return
        failure = warming.exception()
        if failure is not None:
            log.debug("no connection opened ahead to %s: %s", address.authority, failure)
        elif self._closed:
            warming.result().close()
        else:
            warming.result().park()

    def _forget_stale(self) -> None:
        """Close the connections idle for ``keepalive_timeout``; come again for the next one."""
        self._sweep = None
        stale_before = self._loop.time() - self._keepalive_timeout
        next_due: float | None = None
        for address, idle in list(self._idle.items()):
            fresh = 0
            while fresh < len(idle) and idle[fresh].idle_since <= stale_before:
                fresh += 1
            for stale in idle[:fresh]:
                stale.close()
            del idle[:fresh]  # idle is in the order they went idle
            if not idle:
                del self._idle[address]  # its server may be gone for good
            if idle and (next_due is None or idle[0].idle_since < next_due):
                next_due = idle[0].idle_since
        if next_due is not None:
            self._sweep = self._loop.call_at(next_due + self._keepalive_timeout, self._forget_stale)
