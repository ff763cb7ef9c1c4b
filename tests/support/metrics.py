"""Reading llama.cpp's own Prometheus metrics."""

from __future__ import annotations

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
