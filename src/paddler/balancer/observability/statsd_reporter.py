"""Fleet gauges sent to a StatsD server over UDP (``--statsd-enable``).

Every ``interval`` (a second by default) it sends, one datagram each, in StatsD's gauge format
``name:value|g``:

- ``<prefix>.requests_buffered``: requests waiting in the buffer for a slot;
- ``<prefix>.slots_idle``: free slots on usable agents;
- ``<prefix>.slots_processing``: busy slots on usable agents.

The slots are the fleet view's totals (see ``fleet_view``: at 1,000 agents they may be a few
tenths of a second old, a small fleet's are current); the buffer is read as it is.

The send is written here rather than taken from a StatsD client library: the asyncio clients on
PyPI are unmaintained (aiodogstatsd's last release was in 2021), and the maintained ones
(``statsd``, ``datadog``) are synchronous and resolve the server's name with a blocking lookup,
which would stall the event loop. Three gauges are one line of format each, sent through an
asyncio datagram endpoint, which resolves the name without blocking and never blocks on send.

UDP is fire and forget: a StatsD server that is down costs nothing but a log line at debug level.
"""

from __future__ import annotations

import asyncio
import logging

from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.lifecycle import wait_or_shutdown

log = logging.getLogger(__name__)


class _Datagrams(asyncio.DatagramProtocol):
    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" from a StatsD server that is not running, reported on a
        # later send; the next report simply tries again.
        log.debug("statsd send failed: %s", exc)


class StatsdReporter:
    def __init__(
        self,
        view: FleetView,
        buffer: RequestBuffer,
        *,
        host: str,
        port: int,
        prefix: str,
        interval: float = 1.0,
    ) -> None:
        self._view = view
        self._buffer = buffer
        self._host = host
        self._port = port
        prefix = prefix.strip(".")
        self._prefix = f"{prefix}." if prefix else ""
        self._interval = interval

    async def gauges(self) -> dict[str, int]:
        """The values to send now, by full metric name."""
        fleet = await self._view.totals()
        return {
            f"{self._prefix}requests_buffered": self._buffer.waiting,
            f"{self._prefix}slots_idle": fleet.slots_idle,
            f"{self._prefix}slots_processing": fleet.slots_processing,
        }

    async def run(self, shutdown: asyncio.Event) -> None:
        log.info("sending statsd gauges to %s:%d every %gs", self._host, self._port, self._interval)
        transport: asyncio.DatagramTransport | None = None
        try:
            while True:
                if transport is None:
                    transport = await self._open()
                if transport is not None:
                    for name, value in (await self.gauges()).items():
                        transport.sendto(f"{name}:{value}|g".encode())
                if await wait_or_shutdown(shutdown, self._interval):
                    return
        finally:
            if transport is not None:
                transport.close()

    async def _open(self) -> asyncio.DatagramTransport | None:
        """A socket aimed at the StatsD server, or None while its name does not resolve."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                _Datagrams, remote_addr=(self._host, self._port)
            )
        except OSError as error:
            # Often a DNS name that is not there yet (a sidecar starting): try again next time.
            log.warning("cannot reach statsd at %s:%d: %s", self._host, self._port, error)
            return None
        return transport
