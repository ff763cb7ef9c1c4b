"""The real llama.cpp servers that every contestant talks to, one process each."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.processes import log_tail, read_until, spawn, stop
from paddler.agent.llamacpp_child import READY_PREFIX
from paddler.tiny_model import TinyModelShape, ensure_tiny_model
from tests.support.metrics import llamacpp_metrics


@dataclass(frozen=True)
class BackendSpec:
    """How to start the servers: the same for every server of a run."""

    servers: int
    slots: int
    """Slots per server."""
    context_size: int
    """Tokens of context per server, shared by its slots."""
    threads: int
    shape: TinyModelShape = field(default_factory=TinyModelShape)
    """The generated model they serve."""
    cache_ram_mib: int | None = None
    """llama.cpp's RAM prompt cache (``--cache-ram``); None leaves llama.cpp's default."""


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    pid: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def running_backends(spec: BackendSpec, workdir: Path) -> AsyncIterator[list[Backend]]:
    """Start ``spec.servers`` llama.cpp servers on the model of ``spec.shape``; stop them after."""
    model = ensure_tiny_model(spec.shape)
    async with contextlib.AsyncExitStack() as stack:
        backends = [
            await stack.enter_async_context(_running_backend(spec, model, workdir, index))
            for index in range(spec.servers)
        ]
        yield backends


@contextlib.asynccontextmanager
async def _running_backend(
    spec: BackendSpec, model: Path, workdir: Path, index: int
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
        str(spec.slots),
        "--ctx",
        str(spec.context_size),
        "--threads",
        str(spec.threads),
        *(() if spec.cache_ram_mib is None else ("--cache-ram-mib", str(spec.cache_ram_mib))),
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
