"""The proxy port on the HTTP server ``--proxy-server`` names, serving ``ReverseProxy.handle``.

``httptools``: the hand-written server (``proxy_http``); ``aiohttp``: aiohttp's web server with
``client_connections``' rules around its protocol (``aiohttp_exchange``). Both keep the same
promises (timeouts, the connection cap, TLS, SO_REUSEPORT, the order of a graceful shutdown) and
run the same proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from paddler.balancer.proxy import aiohttp_exchange
from paddler.balancer.proxy.client_connections import ClientConnections, ClientConnectionsSite
from paddler.balancer.proxy.proxy_http.connection import Handle
from paddler.balancer.proxy.proxy_http.server import ProxyServer
from paddler.config import BalancerConfig


class ProxyPort:
    def __init__(
        self,
        config: BalancerConfig,
        handle: Handle,
        max_connections: int | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``max_connections``: this process's share of ``--max-client-connections``;
        ``on_shutdown``: called once the port stops accepting, before the drain."""
        self.connections = ClientConnections(
            "reverseproxy",
            config.client_header_timeout,
            config.max_client_connections if max_connections is None else max_connections,
        )
        self._server: ProxyServer | None = None
        self._runner: web.AppRunner | None = None
        if config.proxy_server == "httptools":
            self._server = ProxyServer(
                handle,
                self.connections,
                config.client_keepalive_timeout,
                config.shutdown_drain_timeout,
                on_shutdown,
            )
            return
        app = aiohttp_exchange.proxy_app(handle)
        if on_shutdown is not None:

            async def shutting_down(_: web.Application) -> None:
                await on_shutdown()

            app.on_shutdown.append(shutting_down)
        # First, so that every request the app answers tells its connection's guard.
        app.middlewares.insert(0, self.connections.middleware)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_drain_timeout,
            keepalive_timeout=config.client_keepalive_timeout,
        )

    async def setup(self) -> None:
        if self._runner is not None:
            await self._runner.setup()

    async def listen(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Open the port; return the port bound (the one chosen, for port 0). Raises
        ``OSError``."""
        if self._server is not None:
            return await self._server.listen(host, port, ssl_context, reuse_port)
        assert self._runner is not None
        site = ClientConnectionsSite(
            self._runner, host, port, self.connections, ssl_context, reuse_port
        )
        await site.start()
        return int(self._runner.addresses[-1][1])

    async def close(self) -> None:
        """Stop accepting, call ``on_shutdown``, drain for ``--shutdown-drain-timeout``."""
        if self._server is not None:
            await self._server.close()
        elif self._runner is not None:
            await self._runner.cleanup()
