"""Reading llama.cpp's own Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp


async def llamacpp_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every ``llamacpp:`` sample of a server's /metrics, by name without the prefix."""
    async with session.get(f"{url}/metrics") as response:
        response.raise_for_status()
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, value = line.split()[:2]
            samples[name.removeprefix("llamacpp:")] = float(value)
    return samples


@dataclass
class QueueWatch:
    """What llama.cpp said of its queue and slots, sampled every 10 ms on every server."""

    deferred: list[float] = field(default_factory=list)
    processing: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def watching_llamacpp(
    session: aiohttp.ClientSession, urls: Sequence[str]
) -> AsyncIterator[QueueWatch]:
    """Sample every server's ``requests_deferred`` and ``requests_processing`` until the block
    ends (and once more at its end)."""
    watch = QueueWatch()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for url in urls:
                metrics = await llamacpp_metrics(session, url)
                watch.deferred.append(metrics["requests_deferred"])
                watch.processing.append(metrics["requests_processing"])
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        yield watch
    finally:
        done.set()
        await sampler


def tokens_predicted(text: str) -> int:
    """``tokens_predicted`` of a completion's answer: a whole JSON body, or an event stream's
    last event."""
    final = text if text.startswith("{") else text.strip().split("\n\n")[-1][6:]
    return int(json.loads(final)["tokens_predicted"])
