"""One of ``--workers N`` processes that serve the proxy port, asking the fleet host for slots.

Every worker listens on the same port (SO_REUSEPORT: the kernel spreads new connections over
them) and runs the whole proxy: client keys, TLS, reading bodies, routing traits, the upstream
client, retries, relaying, the request log and traces. Only the fleet is elsewhere: reservations,
the buffer and what servers did go to the fleet host (``remote_fleet``, ``fleet_host``), and
the request counts go there too (``forwarded_metrics``).

Limits that bound the whole balancer are shared out: each worker takes ``1/N`` of
``--max-client-connections`` and of ``--request-body-memory`` (rounded up).

Shutdown: the worker stops accepting, lets its requests in flight finish for
``--shutdown-drain-timeout`` and exits. It also stops when its fleet host goes: nothing could
be served without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from opentelemetry.trace import TracerProvider

from paddler import __version__
from paddler.balancer.fleet.remote_fleet import RemoteFleet
from paddler.balancer.observability.forwarded_metrics import MetricsForwarder
from paddler.balancer.observability.observers import Observers
from paddler.balancer.observability.request_log import RequestLog
from paddler.balancer.observability.tracing import TracingObserver
from paddler.balancer.proxy.api_keys import ApiKeys
from paddler.balancer.proxy.proxy_port import ProxyPort
from paddler.balancer.proxy.reverse_proxy import ReverseProxy
from paddler.balancer.routing.traits_reader import TraitsReader
from paddler.balancer.service import listen_proxy, server_tls, upstream_for
from paddler.config import BalancerConfig

log = logging.getLogger(__name__)


def share(total: int, workers: int) -> int:
    """One worker's share of a limit of the whole balancer."""
    return max(1, -(-total // workers))


class BalancerWorker:
    def __init__(
        self,
        config: BalancerConfig,
        fleet_socket: Path,
        port: int,
        index: int,
        api_keys: ApiKeys,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """``port``: the proxy port, as the fleet host bound it (a port 0 chosen there)."""
        workers = max(1, config.workers)
        self.config = dataclasses.replace(
            config, request_body_memory=share(config.request_body_memory, workers)
        )
        self._max_connections = share(config.max_client_connections, workers)
        self._fleet_socket = fleet_socket
        self._port = port
        self.index = index
        self.api_keys = api_keys
        self._tls, _ = server_tls(config)
        self._tracer_provider = tracer_provider

    async def run(self, shutdown: asyncio.Event) -> None:
        config = self.config
        fleet = await RemoteFleet.connect(
            self._fleet_socket, config.request_buffer_timeout, self.index
        )
        try:
            observers = Observers([RequestLog(), MetricsForwarder(fleet.send)])
            if self._tracer_provider is not None:
                tracer = self._tracer_provider.get_tracer("paddler.balancer", __version__)
                observers.add(TracingObserver(tracer))
            async with (
                upstream_for(config, self.api_keys) as upstream,
                TraitsReader(prompts=config.routing == "prefix") as traits,
            ):
                proxy = ReverseProxy(config, fleet, upstream, observers, traits, self.api_keys)
                port_server = ProxyPort(config, proxy.handle, self._max_connections)
                stopping = asyncio.Event()
                progress = asyncio.create_task(fleet.run(stopping))
                await port_server.setup()
                try:
                    port = await listen_proxy(
                        port_server,
                        config.reverseproxy_host,
                        self._port,
                        self._tls,
                        reuse_port=True,
                    )
                    fleet.listening(port)
                    log.info(
                        "worker %d (pid %d) listening on port %d", self.index, os.getpid(), port
                    )
                    until = asyncio.ensure_future(shutdown.wait())
                    # ``fleet.closed`` itself, not a copy: it must stay uncancelled, since the
                    # link serves the requests that drain below.
                    await asyncio.wait({fleet.closed, until}, return_when=asyncio.FIRST_COMPLETED)
                    until.cancel()
                    log.info("worker %d: draining requests in flight", self.index)
                finally:
                    await port_server.close()
                    stopping.set()
                    await progress
        finally:
            fleet.disconnect()
        log.info("worker %d stopped", self.index)
