"""The real llama.cpp servers that every contestant talks to, one process each."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.config import BenchConfig
from bench.processes import log_tail, read_until, spawn, stop
from paddler.agent.llamacpp_child import READY_PREFIX
from paddler.tiny_model import TinyModelShape, ensure_tiny_model
from tests.support.metrics import llamacpp_metrics


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    pid: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def running_backends(config: BenchConfig, workdir: Path) -> AsyncIterator[list[Backend]]:
    """Start ``config.servers`` llama.cpp servers on the tiny default model; stop them after."""
    model = ensure_tiny_model(TinyModelShape())
    async with contextlib.AsyncExitStack() as stack:
        backends = [
            await stack.enter_async_context(_running_backend(config, model, workdir, index))
            for index in range(config.servers)
        ]
        yield backends


@contextlib.asynccontextmanager
async def _running_backend(
    config: BenchConfig, model: Path, workdir: Path, index: int
) -> AsyncIterator[Backend]:
    name = f"llamacpp-{index}"
    log_path = workdir / f"{name}.log"
    # stdin stays open for as long as the server should run: at its end of file the child exits.
    process = await spawn(
        sys.executable,
        "-m",
        "paddler.agent.llamacpp_child",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--slots",
        str(config.slots),
        "--ctx",
        str(config.context_size),
        "--threads",
        str(config.threads),
        log_path=log_path,
        stdin_pipe=True,
        stdout_pipe=True,
    )
    try:
        assert process.stdout is not None
        try:
            line = await read_until(process.stdout, READY_PREFIX, 60.0, process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{name} did not start: {error}\n{log_tail(log_path)}") from error
        yield Backend(name=name, url=line.split()[-1], pid=process.pid)
    finally:
        await stop(process)


async def props(session: aiohttp.ClientSession, backend: Backend) -> dict[str, Any]:
    async with session.get(f"{backend.url}/props") as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def metrics(session: aiohttp.ClientSession, backend: Backend) -> dict[str, float]:
    """Every ``llamacpp:`` sample of the server's Prometheus text, by name without the prefix."""
    return await llamacpp_metrics(session, backend.url)
