"""Makes docs/dashboard.png: the web dashboard of a live local cluster under a little traffic.

A ``paddler balancer --management-dashboard-enable`` process, two ``paddler agent --model``
processes each running a real llama.cpp on the tiny model, and a third agent whose llama.cpp is
not there (so the picture shows how a failing server looks). Traffic comes in waves, a little
above the fleet's slots at their peak, so that the charts show requests, buffering and a few
requests refused by the full buffer. Then headless Chromium (Debian's package) takes the picture.

Run it with ``./scripts/screenshot-dashboard``; ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiohttp

from bench.paddler import RunningPaddler, agents, running_balancer
from bench.processes import free_port, log_tail, spawn, stop
from paddler.tiny_model import TinyModelShape, ensure_tiny_model
from tests.support.browser import chromium

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 4
BUFFER = 4
WAVE_SECONDS = 24.0
# Slow enough (a few hundred tokens/s on one core) that a request holds its slot for a while.
MODEL_SHAPE = TinyModelShape(embedding_length=256, block_count=4, feed_forward_length=768)
HEALTHY = ("node-a", "node-b")


@contextlib.asynccontextmanager
async def agent(workdir: Path, management_url: str, name: str, *argv: str) -> AsyncIterator[None]:
    process = await spawn(
        sys.executable,
        "-m",
        "paddler",
        "agent",
        f"--name={name}",
        f"--management-port={management_url.rsplit(':', 1)[1]}",
        "--monitoring-interval=100ms",
        *argv,
        log_path=workdir / f"{name}.log",
    )
    try:
        yield
    finally:
        await stop(process, timeout=10.0)


async def wait_for_fleet(session: aiohttp.ClientSession, paddler: RunningPaddler) -> None:
    async with asyncio.timeout(60.0):
        while True:
            fleet = await agents(session, paddler)
            states = {entry["name"]: entry["state"] for entry in fleet["agents"]}
            if len(states) == len(HEALTHY) + 1 and all(states.get(n) == "ok" for n in HEALTHY):
                return
            await asyncio.sleep(0.1)


async def traffic(session: aiohttp.ClientSession, proxy_url: str, stop: asyncio.Event) -> None:
    """Waves of concurrent completions until ``stop``: from 1 to one more than slots and buffer hold.

    A wave peaks every ``WAVE_SECONDS``, first at half of it.
    """
    started = time.monotonic()
    peak = SLOTS * len(HEALTHY) + BUFFER + 1
    running: set[asyncio.Task[None]] = set()

    async def one() -> None:
        body = {
            "prompt": "Tell me a story about a lighthouse.",
            "n_predict": random.randint(16, 64),
        }
        with contextlib.suppress(aiohttp.ClientError):
            async with session.post(f"{proxy_url}/completion", json=body) as response:
                await response.read()

    while not stop.is_set():
        elapsed = time.monotonic() - started
        wave = 0.5 - 0.5 * math.cos(2 * math.pi * elapsed / WAVE_SECONDS)
        wanted = 1 + round(wave * (peak - 1))
        while len(running) < wanted:
            task = asyncio.create_task(one())
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.sleep(0.1)
    await asyncio.gather(*running)


async def screenshot(url: str, output: Path, width: int, scheme: Literal["dark", "light"]) -> None:
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": width, "height": 720}, color_scheme=scheme)
        await page.goto(url)
        await page.wait_for_selector('#connection[data-state="live"]')
        await page.wait_for_selector("#agents tr")
        await page.screenshot(path=str(output), full_page=True)


async def main(arguments: argparse.Namespace) -> None:
    model = ensure_tiny_model(MODEL_SHAPE)
    with tempfile.TemporaryDirectory(prefix="paddler-screenshot-") as directory:
        workdir = Path(directory)
        async with contextlib.AsyncExitStack() as stack:
            paddler = await stack.enter_async_context(
                running_balancer(
                    workdir,
                    "--management-dashboard-enable",
                    f"--request-buffer-size={BUFFER}",
                    "--request-buffer-timeout=20s",
                )
            )
            for name in HEALTHY:
                await stack.enter_async_context(
                    agent(
                        workdir,
                        paddler.management_url,
                        name,
                        f"--model={model}",
                        f"--slots={SLOTS}",
                        "--threads=1",
                        "--local-llamacpp-port=0",
                        "--model-alias=paddler-tiny",
                    )
                )
            # Nothing listens on this port: the agent reports its llama.cpp unreachable.
            await stack.enter_async_context(
                agent(
                    workdir,
                    paddler.management_url,
                    "node-c",
                    f"--local-llamacpp-port={free_port()}",
                )
            )
            session = await stack.enter_async_context(aiohttp.ClientSession())
            try:
                await wait_for_fleet(session, paddler)
            except TimeoutError:
                raise SystemExit(f"the fleet never became ready:\n{_logs(workdir)}") from None
            print(
                f"dashboard: {paddler.management_url}/dashboard; traffic for {arguments.seconds}s"
            )
            stop_traffic = asyncio.Event()
            load = asyncio.create_task(traffic(session, paddler.proxy_url, stop_traffic))
            try:
                # The picture is taken under load, as the charts fill up (not a readiness wait).
                await asyncio.sleep(arguments.seconds)
                await screenshot(
                    f"{paddler.management_url}/dashboard",
                    arguments.output,
                    arguments.width,
                    arguments.color_scheme,
                )
            finally:
                stop_traffic.set()
                await load
    print(f"wrote {arguments.output}")


def _logs(workdir: Path) -> str:
    return "\n".join(log_tail(path) for path in sorted(workdir.glob("*.log")))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.5 * WAVE_SECONDS,
        help="traffic before the picture (the default ends near the top of a wave)",
    )
    parser.add_argument("--width", type=int, default=1400, help="browser window width (px)")
    parser.add_argument("--color-scheme", choices=["dark", "light"], default="dark")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
