"""The balancer as one service: both ports, the fleet, the buffer and the membership sweep.

Shutdown, in order: the proxy port stops accepting; buffered requests are answered 503; requests
in flight get ``shutdown_drain_timeout`` seconds to finish and are then cut; finally the agents'
sockets and the management port close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from opentelemetry.trace import TracerProvider

from paddler import __version__
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_host import FleetHost
from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.fleet.shared_state import SharedFleet, redacted, running_shared_fleet
from paddler.balancer.fleet.state import LocalFleet
from paddler.balancer.management.agent_socket import AgentSocket
from paddler.balancer.management.agent_verifier import AgentVerifier
from paddler.balancer.management.agents_route import AgentsRoute
from paddler.balancer.management.autoscaling import AutoscalingRoute
from paddler.balancer.management.management_app import ManagementApp
from paddler.balancer.observability.observers import Observers
from paddler.balancer.observability.prometheus_metrics import PrometheusMetrics
from paddler.balancer.observability.request_log import RequestLog
from paddler.balancer.observability.stats_history import StatsHistory
from paddler.balancer.observability.statsd_reporter import StatsdReporter
from paddler.balancer.observability.tracing import TracingObserver
from paddler.balancer.proxy.api_keys import ApiKeys
from paddler.balancer.proxy.client_connections import ClientConnections, ClientConnectionsSite
from paddler.balancer.proxy.proxy_port import ProxyPort
from paddler.balancer.proxy.reverse_proxy import ReverseProxy
from paddler.balancer.proxy.upstream import Upstream
from paddler.balancer.routing.policies import make_policy
from paddler.balancer.routing.traits_reader import TraitsReader
from paddler.config import BalancerConfig, is_loopback
from paddler.lifecycle import wait_or_shutdown
from paddler.tls import server_context

log = logging.getLogger(__name__)


MANAGEMENT_CONNECTION_HEADROOM = 256
"""Connections the management port accepts beyond one per agent (``--max-agents``)."""


WORKER_EXIT_GRACE = 5.0
"""Seconds a worker has, beyond ``--shutdown-drain-timeout``, to exit after its drain."""


class ListenFailed(Exception):
    """A port could not be opened: taken by another process, or not an address of this host."""


class Balancer:
    def __init__(
        self,
        config: BalancerConfig,
        on_listening: Callable[[str, int], None] | None = None,
        tracer_provider: TracerProvider | None = None,
        api_keys: ApiKeys | None = None,
        fleet_socket: Path | None = None,
    ) -> None:
        """``api_keys``: the client keys, when the caller keeps them to reload them (SIGHUP);
        by default they are read from ``config``. Raises ``ApiKeyError`` or ``TlsError`` for
        unusable key, certificate or key files.

        ``fleet_socket``: with ``--workers`` above 1, where this process serves the fleet to
        the workers (see ``fleet_host``); it then reserves the proxy port (``proxy_port_bound``
        is set once it has) and is ready once every worker listens there. Starting the
        workers is the caller's business."""
        config.validate()
        self.config = config
        self.api_keys = (
            api_keys if api_keys is not None else ApiKeys(config.api_keys, config.api_keys_file)
        )
        self._proxy_tls, self._management_tls = server_tls(config)
        # One policy, passed to each part that asks it something (none reaches it through
        # another).
        self.policy = make_policy(config.routing, config.prefix_index_memory)
        self.pool = AgentControllerPool(
            settle_timeout=config.slot_settle_timeout,
            circuit_cooldown=config.circuit_breaker_cooldown,
            failure_threshold=config.circuit_breaker_failure_threshold,
            max_agents=config.max_agents,
            policy=self.policy,
            allow_unknown_models=config.allow_unknown_models,
        )
        self.buffer = RequestBuffer(
            self.pool,
            policy=self.policy,
            size=config.request_buffer_size,
            timeout=config.request_buffer_timeout,
        )
        self.fleet_view = FleetView(self.pool)
        self.stats_history = StatsHistory(self.fleet_view, self.buffer)
        self.observers = Observers([RequestLog(), self.stats_history])
        if tracer_provider is not None:
            tracer = tracer_provider.get_tracer("paddler.balancer", __version__)
            self.observers.add(TracingObserver(tracer))
        self.prometheus = PrometheusMetrics(self.fleet_view, self.pool, self.buffer, self.policy)
        self.observers.add(self.prometheus)
        self._on_listening = on_listening
        self.management_port: int | None = None
        self.reverseproxy_port: int | None = None
        self.ready = asyncio.Event()
        self.proxy_port_bound = asyncio.Event()
        self._port_reservation: socket.socket | None = None
        self._shared: SharedFleet | None = None
        """With a shared ``--state``: the fleet the proxy asks (see ``shared_state``)."""
        self.fleet_host = (
            None
            if fleet_socket is None
            else FleetHost(
                self.pool,
                self.buffer,
                self.policy,
                Observers([self.stats_history, self.prometheus]),
                fleet_socket,
                config.workers,
            )
        )

    async def run(self, shutdown: asyncio.Event) -> None:
        if not self.config.shared_state:
            await self._run(shutdown)
            return
        async with running_shared_fleet(self.config, self.pool) as shared:
            self._shared = shared
            log.info(
                "fleet state shared on %s as replica %s",
                redacted(self.config.state),
                shared.replica,
            )
            await self._run(shutdown)

    async def _run(self, shutdown: asyncio.Event) -> None:
        config = self.config
        async with (
            upstream_for(config, self.api_keys) as upstream,
            TraitsReader(prompts=config.routing == "prefix") as traits,
        ):
            verifier = AgentVerifier(
                self.pool,
                upstream,
                max_slots=config.max_slots_per_agent,
                api_key=config.llamacpp_api_key,
            )
            socket = AgentSocket(
                self.pool, verifier, config.management_token, stale_after=config.agent_stale_after
            )
            management_app = ManagementApp(
                AgentsRoute(self.fleet_view, self.buffer),
                socket,
                self.stats_history,
                self.prometheus,
                AutoscalingRoute(
                    self.fleet_view, self.buffer, config.autoscaling_target_utilization
                ),
                dashboard=config.management_dashboard_enable,
            ).app()

            async def close_sockets(_: web.Application) -> None:
                await socket.close_all()

            management_app.on_shutdown.append(close_sockets)
            # Every agent holds one connection; the headroom is for the API, the dashboards and
            # agents reconnecting while their old socket is still being closed.
            management_connections = ClientConnections(
                "management",
                config.client_header_timeout,
                config.max_agents + MANAGEMENT_CONNECTION_HEADROOM,
                f"--max-agents {config.max_agents} + {MANAGEMENT_CONNECTION_HEADROOM}",
            )
            management_app.middlewares.insert(0, management_connections.middleware)
            management = web.AppRunner(
                management_app,
                access_log=None,
                handle_signals=False,
                keepalive_timeout=config.client_keepalive_timeout,
            )
            # The proxy port is served here, or by the workers (``--workers``).
            reverse_proxy = ReverseProxy(
                config,
                self._shared.fleet
                if self._shared is not None
                else LocalFleet(self.pool, self.buffer, self.policy),
                upstream,
                self.observers,
                traits,
                self.api_keys,
            )
            proxy = ProxyPort(config, reverse_proxy.handle, on_shutdown=self._close_buffer)
            await management.setup()
            try:
                if self.fleet_host is None:
                    await proxy.setup()
                else:
                    await self.fleet_host.start()
                try:
                    self.management_port = await listen(
                        management,
                        config.management_host,
                        config.management_port,
                        management_connections,
                        self._management_tls,
                    )
                    self._announce("management", config.management_host, self.management_port)
                    if self.fleet_host is None:
                        self.reverseproxy_port = await listen_proxy(
                            proxy,
                            config.reverseproxy_host,
                            config.reverseproxy_port,
                            self._proxy_tls,
                        )
                    elif not await self._reserve_for_workers(self.fleet_host, shutdown):
                        return
                    assert self.reverseproxy_port is not None
                    self._announce("reverseproxy", config.reverseproxy_host, self.reverseproxy_port)
                    self._warn_of_clear_text()
                    self.ready.set()
                    async with asyncio.TaskGroup() as services:
                        services.create_task(self._sweep_until(shutdown))
                        services.create_task(socket.run(shutdown))
                        if config.statsd_enable:
                            services.create_task(self._statsd_reporter().run(shutdown))
                        services.create_task(self.stats_history.run(shutdown))
                    log.info("shutting down: draining requests in flight")
                finally:
                    if self.fleet_host is None:
                        await proxy.close()
                    else:
                        await self._drain_workers(self.fleet_host)
            finally:
                await management.cleanup()
        log.info("balancer stopped")

    async def _reserve_for_workers(self, host: FleetHost, shutdown: asyncio.Event) -> bool:
        """Bind the proxy port (so that a port 0 is chosen once, here) and wait until every
        worker listens on it; False if shutdown came first."""
        config = self.config
        self._port_reservation = reserve_port(config.reverseproxy_host, config.reverseproxy_port)
        self.reverseproxy_port = int(self._port_reservation.getsockname()[1])
        self.proxy_port_bound.set()
        log.info("waiting for %d worker(s) to listen on the proxy port", config.workers)
        listening = asyncio.ensure_future(host.all_listening.wait())
        stopping = asyncio.ensure_future(shutdown.wait())
        await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        stopping.cancel()
        return host.all_listening.is_set()

    async def _drain_workers(self, host: FleetHost) -> None:
        """Answer the buffered requests, then wait for the workers to finish theirs."""
        await self._close_buffer()
        if host.links:
            log.info("waiting for %d worker(s) to drain", host.links)
        try:
            await host.drained(self.config.shutdown_drain_timeout + WORKER_EXIT_GRACE)
        except TimeoutError:
            log.warning("%d worker(s) still connected after the drain timeout", host.links)
        host.close()
        if self._port_reservation is not None:
            self._port_reservation.close()

    async def _close_buffer(self) -> None:
        if self._shared is not None:
            self._shared.fleet.close()
        waiting = self.buffer.waiting
        self.buffer.close()
        if waiting:
            log.info("answered %d buffered request(s) with 503", waiting)

    def _statsd_reporter(self) -> StatsdReporter:
        config = self.config
        return StatsdReporter(
            self.fleet_view,
            self.buffer,
            host=config.statsd_host,
            port=config.statsd_port,
            prefix=config.statsd_prefix,
            interval=config.statsd_interval,
        )

    async def _sweep_until(self, shutdown: asyncio.Event) -> None:
        interval = min(0.25, self.config.agent_stale_after / 4)
        while not await wait_or_shutdown(shutdown, interval):
            self.pool.sweep(self.config.agent_stale_after)

    def _announce(self, role: str, host: str, port: int) -> None:
        scheme = getattr(self.config, f"{role}_scheme")
        log.info("%s listening on %s://%s:%d", role, scheme, host, port)
        if self._on_listening is not None:
            self._on_listening(role, port)

    def _warn_of_clear_text(self) -> None:
        """Secrets that would cross the network unencrypted: allowed, but said out loud."""
        config = self.config
        if (
            config.management_token
            and self._management_tls is None
            and not is_loopback(config.management_host)
        ):
            log.warning(
                "agents send the management token to %s in clear text: give the management "
                "port a certificate (--management-tls-cert, --management-tls-key)",
                config.management_host,
            )
        if (
            self.api_keys.enabled
            and self._proxy_tls is None
            and not is_loopback(config.reverseproxy_host)
        ):
            log.warning(
                "clients send their API keys to %s in clear text: give the proxy port a "
                "certificate (--reverseproxy-tls-cert, --reverseproxy-tls-key)",
                config.reverseproxy_host,
            )


def upstream_for(config: BalancerConfig, api_keys: ApiKeys) -> Upstream:
    """The client for the llama.cpp servers, as ``config`` asks."""
    return Upstream(
        connect_timeout=config.upstream_connect_timeout,
        keepalive_timeout=config.upstream_keepalive_timeout,
        read_timeout=config.upstream_read_timeout,
        rewrite_host_header=config.rewrite_host_header,
        llamacpp_api_key=config.llamacpp_api_key,
        drop_client_keys=api_keys.enabled,
        client=config.upstream_client,
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that does not listen: the workers'
    listening sockets join it there, and the kernel hands connections to those alone."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reservation = socket.socket(family, kind, proto)
        try:
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reservation.bind(address)
        except BaseException:
            reservation.close()
            raise
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ListenFailed(f"cannot listen on {host}:{port}: {reason}") from None
    return reservation


def server_tls(config: BalancerConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """The proxy port's and the management port's TLS contexts (None: plain HTTP); raises
    ``TlsError`` for files that cannot be used."""

    def context(cert: Path | None, key: Path | None, flags: str) -> ssl.SSLContext | None:
        return None if cert is None or key is None else server_context(cert, key, flags=flags)

    return (
        context(config.reverseproxy_tls_cert, config.reverseproxy_tls_key, "--reverseproxy-tls"),
        context(config.management_tls_cert, config.management_tls_key, "--management-tls"),
    )


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    connections: ClientConnections,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> int:
    """Open the port; return the port bound (the one chosen, for port 0)."""
    site = ClientConnectionsSite(runner, host, port, connections, ssl_context, reuse_port)
    try:
        await site.start()
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ListenFailed(f"cannot listen on {host}:{port}: {reason}") from None
    address = runner.addresses[-1]
    return int(address[1])


async def listen_proxy(
    proxy: ProxyPort,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> int:
    """Open the proxy port; return the port bound. Raises ``ListenFailed``."""
    try:
        return await proxy.listen(host, port, ssl_context, reuse_port)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ListenFailed(f"cannot listen on {host}:{port}: {reason}") from None
