"""Watching the queues while a run goes on: llama.cpp's own and, for Paddler, Paddler's buffer.

The benchmark means to measure what a proxy hop costs, not time spent waiting for a slot. Every
server's ``/metrics`` is polled every ``interval`` seconds for ``requests_deferred`` (llama.cpp's
internal wait queue) and ``requests_processing`` (busy slots); when Paddler is the contestant,
its management API is polled for ``requests_buffered``. The peaks go into the results, so that a
reader can check that nothing queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from bench.llamacpp import Backend, metrics
from bench.paddler import RunningPaddler, agents

log = logging.getLogger(__name__)


@dataclass
class Peaks:
    deferred: float = 0.0
    processing: float = 0.0
    buffered: float | None = None
    """Paddler's buffer; None when it was not watched."""
    polls: int = 0

    def merge(self, other: Peaks) -> None:
        self.deferred = max(self.deferred, other.deferred)
        self.processing = max(self.processing, other.processing)
        if other.buffered is not None:
            self.buffered = max(self.buffered or 0.0, other.buffered)
        self.polls += other.polls


class QueueWatch:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        backends: list[Backend],
        paddler: RunningPaddler | None,
        interval: float,
    ) -> None:
        self._session = session
        self._backends = backends
        self._paddler = paddler
        self._interval = interval
        self.peaks = Peaks(buffered=0.0 if paddler is not None else None)

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and the next one tried."""
        while True:
            try:
                await self._poll()
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("polling the queues failed: %r", error)
            await asyncio.sleep(self._interval)

    async def _poll(self) -> None:
        async with asyncio.timeout(5.0):
            samples = await asyncio.gather(
                *(metrics(self._session, backend) for backend in self._backends)
            )
            processing = sum(sample.get("requests_processing", 0.0) for sample in samples)
            deferred = sum(sample.get("requests_deferred", 0.0) for sample in samples)
            self.peaks.processing = max(self.peaks.processing, processing)
            self.peaks.deferred = max(self.peaks.deferred, deferred)
            if self._paddler is not None:
                fleet = await agents(self._session, self._paddler)
                self.peaks.buffered = max(self.peaks.buffered or 0.0, fleet["requests_buffered"])
            self.peaks.polls += 1


@contextlib.asynccontextmanager
async def watching_queues(
    session: aiohttp.ClientSession,
    backends: list[Backend],
    paddler: RunningPaddler | None,
    interval: float,
) -> AsyncIterator[Peaks]:
    """Poll while the block runs; the yielded peaks are final once it has ended."""
    watch = QueueWatch(session, backends, paddler, interval)
    task = asyncio.create_task(watch.run())
    try:
        yield watch.peaks
    finally:
        task.cancel()
        # Waits for the poller to end without taking its CancelledError for our own.
        await asyncio.wait([task])
