"""Watching the queues while a run goes on: llama.cpp's own and, for Paddler, Paddler's buffer.

The benchmark means to measure what a proxy hop costs, not time spent waiting for a slot. Every
server's ``/metrics`` is polled every ``interval`` seconds for ``requests_deferred`` (llama.cpp's
internal wait queue) and ``requests_processing`` (busy slots); when Paddler is the contestant,
its management API is polled for ``requests_buffered``. The samples are time-stamped, so that
they can be narrowed to the measured part of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp

from bench.llamacpp import Backend, metrics
from bench.paddler import RunningPaddler, agents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueSample:
    at: float
    """``time.perf_counter()`` when the answers had all arrived."""
    deferred: float
    """``requests_deferred`` summed over the servers."""
    processing: float
    buffered: float | None
    """Paddler's ``requests_buffered``; None when Paddler was not the contestant."""


@dataclass(frozen=True)
class QueuePeaks:
    polls: int
    max_deferred: float
    max_processing: float
    max_buffered: float | None
    mean_buffered: float | None

    @classmethod
    def of(cls, samples: Iterable[QueueSample]) -> QueuePeaks:
        samples = list(samples)
        buffered = [sample.buffered for sample in samples if sample.buffered is not None]
        return cls(
            polls=len(samples),
            max_deferred=max((sample.deferred for sample in samples), default=0.0),
            max_processing=max((sample.processing for sample in samples), default=0.0),
            max_buffered=max(buffered) if buffered else None,
            mean_buffered=sum(buffered) / len(buffered) if buffered else None,
        )


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
        self.samples: list[QueueSample] = []

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and the next one tried."""
        while True:
            try:
                self.samples.append(await self._poll())
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("polling the queues failed: %r", error)
            await asyncio.sleep(self._interval)

    async def _poll(self) -> QueueSample:
        async with asyncio.timeout(5.0):
            found = await asyncio.gather(
                *(metrics(self._session, backend) for backend in self._backends)
            )
            buffered = None
            if self._paddler is not None:
                buffered = float((await agents(self._session, self._paddler))["requests_buffered"])
        return QueueSample(
            at=time.perf_counter(),
            deferred=sum(sample.get("requests_deferred", 0.0) for sample in found),
            processing=sum(sample.get("requests_processing", 0.0) for sample in found),
            buffered=buffered,
        )


@contextlib.asynccontextmanager
async def watching_queues(
    session: aiohttp.ClientSession,
    backends: list[Backend],
    paddler: RunningPaddler | None,
    interval: float,
) -> AsyncIterator[list[QueueSample]]:
    """Poll while the block runs; the yielded list of samples grows until it ends."""
    watch = QueueWatch(session, backends, paddler, interval)
    task = asyncio.create_task(watch.run())
    try:
        yield watch.samples
    finally:
        task.cancel()
        # Waits for the poller to end without taking its CancelledError for our own.
        await asyncio.wait([task])
