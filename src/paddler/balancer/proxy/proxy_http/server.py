"""The proxy port served by ``proxy_http``: listening, and the order of a graceful shutdown.

Shutdown (``close``), in the order aiohttp's runner follows for ``--proxy-server aiohttp``:
stop accepting; ``on_shutdown`` (the balancer answers its buffered requests 503); close idle
kept-alive connections at once and every other one after its answer in progress; after
``drain_timeout`` seconds, cut what is left (its requests are cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from paddler.balancer.proxy.client_connections import ClientConnections
from paddler.balancer.proxy.proxy_http.connection import Connection, Handle

log = logging.getLogger(__name__)


class ProxyServer:
    """Serves ``handle`` (``ReverseProxy.handle``) by ``connections``' rules."""

    def __init__(
        self,
        handle: Handle,
        connections: ClientConnections,
        keepalive_timeout: float,
        drain_timeout: float,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._handle = handle
        self.connections = connections
        self._keepalive_timeout = keepalive_timeout
        self._drain_timeout = drain_timeout
        self._on_shutdown = on_shutdown
        self._open: set[Connection] = set()
        self._all_closed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    async def listen(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Open the port; return the port bound. Raises ``OSError`` as ``create_server``."""
        loop = asyncio.get_running_loop()
        connections = self.connections
        tls = ssl_context is not None
        closed = self._closed  # one bound method for every connection, not one each

        def make() -> Connection:
            connection = Connection(
                self._handle, connections, self._keepalive_timeout, loop, closed
            )
            self._open.add(connection)
            return connection

        # The backlog as ``client_connections.ClientConnectionsSite``'s, for the same burst.
        backlog = max(128, min(connections.max_connections or 128, 65535))
        self._server = await loop.create_server(
            make,
            host,
            port,
            ssl=ssl_context,
            # An unfinished handshake must not hold a connection longer than a late head can.
            ssl_handshake_timeout=connections.header_timeout if tls else None,
            backlog=backlog,
            reuse_port=reuse_port or None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _closed(self, connection: Connection) -> None:
        self._open.discard(connection)
        if not self._open and self._all_closed is not None:
            self._all_closed.set()

    async def close(self) -> None:
        """Stop accepting, let the requests in flight finish (see the module docstring)."""
        if self._server is not None:
            self._server.close()
        if self._on_shutdown is not None:
            await self._on_shutdown()
        # A connection accepted but never served (refused over the cap) is not tracked.
        for connection in list(self._open):
            if connection.transport is None:
                self._open.discard(connection)
        self._all_closed = asyncio.Event()
        for connection in list(self._open):
            connection.shut()
        if self._open:
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                log.info(
                    "reverseproxy port: cutting %d connection(s) still busy after the drain",
                    len(self._open),
                )
                for connection in list(self._open):
                    connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
