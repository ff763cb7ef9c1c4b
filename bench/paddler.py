"""Paddler as it is deployed: a ``paddler balancer`` process and a ``paddler agent`` per server.

The balancer listens on port 0 and its log line says which port it got. It is ready for the
benchmark once every agent is registered and reports ``ok`` with all of its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.llamacpp import Backend
from bench.processes import log_tail, spawn, stop

_LISTENING = re.compile(r"(management|reverseproxy) listening on (http://\S+)")


@dataclass(frozen=True)
class RunningPaddler:
    proxy_url: str
    management_url: str
    balancer_pid: int


@contextlib.asynccontextmanager
async def running_paddler(
    backends: list[Backend],
    slots: int,
    workdir: Path,
    balancer_flags: Sequence[str] = (),
    agent_flags: Sequence[str] = ("--monitoring-interval=100ms",),
) -> AsyncIterator[RunningPaddler]:
    """Run the balancer (with ``balancer_flags``) and one agent per backend until the block
    ends; ready once every agent reports its ``slots`` slots."""
    async with contextlib.AsyncExitStack() as stack:
        paddler = await stack.enter_async_context(running_balancer(workdir, *balancer_flags))
        management_port = paddler.management_url.rsplit(":", 1)[1]
        for backend in backends:
            await stack.enter_async_context(
                _running_agent(backend, management_port, workdir, agent_flags)
            )
        await _wait_for_agents(paddler, backends, slots, workdir)
        yield paddler


@contextlib.asynccontextmanager
async def running_balancer(workdir: Path, *flags: str) -> AsyncIterator[RunningPaddler]:
    """A ``paddler balancer`` process on free ports, with ``flags``, logging to ``workdir``."""
    log_path = workdir / "balancer.log"
    process = await spawn(
        sys.executable,
        "-m",
        "paddler",
        "balancer",
        "--management-port=0",
        "--reverseproxy-port=0",
        *flags,
        log_path=log_path,
        stderr_pipe=True,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert process.stderr is not None
        try:
            urls = await _read_listening(process.stderr, log_path)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"the balancer did not start: {error}") from error
        drain = asyncio.create_task(_copy_lines(process.stderr, log_path))
        yield RunningPaddler(
            proxy_url=urls["reverseproxy"],
            management_url=urls["management"],
            balancer_pid=process.pid,
        )
    finally:
        await stop(process, timeout=10.0)
        if drain is not None:
            # Usually over already: the balancer's exit closed the pipe.
            drain.cancel()
            await asyncio.wait([drain])


async def _read_listening(stderr: asyncio.StreamReader, log_path: Path) -> dict[str, str]:
    urls: dict[str, str] = {}
    with log_path.open("a") as log:
        async with asyncio.timeout(30.0):
            while len(urls) < 2:
                line = await stderr.readline()
                if not line:
                    raise RuntimeError("it exited before listening")
                text = line.decode(errors="replace")
                log.write(text)
                if match := _LISTENING.search(text):
                    urls[match.group(1)] = match.group(2)
    return urls


async def _copy_lines(stream: asyncio.StreamReader, log_path: Path) -> None:
    """Keep reading the balancer's log, so that a full pipe never blocks it."""
    with log_path.open("ab") as log:
        while line := await stream.readline():
            log.write(line)


@contextlib.asynccontextmanager
async def _running_agent(
    backend: Backend, management_port: str, workdir: Path, flags: Sequence[str]
) -> AsyncIterator[None]:
    name = f"agent-{backend.name}"
    process = await spawn(
        sys.executable,
        "-m",
        "paddler",
        "agent",
        f"--local-llamacpp-port={backend.port}",
        f"--management-port={management_port}",
        f"--name={name}",
        *flags,
        log_path=workdir / f"{name}.log",
    )
    try:
        yield
    finally:
        await stop(process, timeout=10.0)


async def prometheus_text(session: aiohttp.ClientSession, paddler: RunningPaddler) -> str:
    """The balancer's own Prometheus exposition (management port, ``GET /metrics``)."""
    async with session.get(f"{paddler.management_url}/metrics") as response:
        response.raise_for_status()
        return await response.text()


async def agents(session: aiohttp.ClientSession, paddler: RunningPaddler) -> dict[str, Any]:
    async with session.get(f"{paddler.management_url}/api/v1/agents") as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def _wait_for_agents(
    paddler: RunningPaddler, backends: list[Backend], slots: int, workdir: Path
) -> None:
    """Poll the management API until every backend's agent is ``ok`` with all its slots."""
    wanted = {backend.url for backend in backends}
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(30.0):
                while True:
                    fleet = await agents(session, paddler)
                    ready = {
                        agent["url"]
                        for agent in fleet["agents"]
                        if agent["state"] == "ok" and agent["slots_total"] == slots
                    }
                    if wanted <= ready:
                        return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError(f"the agents never became ready:\n{_agent_logs(workdir)}") from None


def _agent_logs(workdir: Path) -> str:
    return "\n".join(log_tail(path, 10) for path in sorted(workdir.glob("agent-*.log")))
