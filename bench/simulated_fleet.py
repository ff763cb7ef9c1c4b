"""The scale benchmark's fleet: the fast upstream, and a balancer whose agents are simulated.

``running_upstream`` starts one fast upstream process (``fast_upstream``) with a port per
simulated llama.cpp server. ``running_fleet`` starts a ``paddler balancer`` process and one
``fake_agents`` process with an agent for each of the first ``size`` ports, and is ready once
the balancer's own ``/health`` counts every agent's slots: the balancer has then reached every
address itself (``GET /health`` and ``/props``) and believed the reports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.child_control import Child, running_child
from bench.llamacpp import Backend
from bench.paddler import RunningPaddler, running_balancer
from bench.processes import log_tail


@dataclass(frozen=True)
class Upstream:
    child: Child
    ports: list[int]
    slots: int

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def backends(self, count: int) -> list[Backend]:
        """The first ``count`` servers, as nginx's configuration wants them."""
        return [
            Backend(name=f"fast-{index}", url=self.url(index), pid=self.child.pid)
            for index in range(count)
        ]


@contextlib.asynccontextmanager
async def running_upstream(
    ports: int, slots: int, workdir: Path, name: str = "fast-upstream"
) -> AsyncIterator[Upstream]:
    async with running_child(
        name, "bench.fast_upstream", f"--ports={ports}", f"--slots={slots}", workdir=workdir
    ) as child:
        yield Upstream(child, [int(port) for port in child.ready["ports"]], slots)


@dataclass(frozen=True)
class Fleet:
    paddler: RunningPaddler
    agents: Child
    size: int


@contextlib.asynccontextmanager
async def running_fleet(
    upstream: Upstream,
    size: int,
    workdir: Path,
    flags: Sequence[str],
    *,
    name: str,
    busy: bool = False,
    ready_timeout: float = 120.0,
) -> AsyncIterator[Fleet]:
    """A balancer with ``flags`` and ``size`` simulated agents; ``busy``: they report no idle
    slot (every request is buffered until ``agents.ask("free")``)."""
    directory = workdir / name
    directory.mkdir()
    async with running_balancer(directory, *flags) as paddler:
        agent_args = [paddler.management_url, f"--slots={upstream.slots}"]
        agent_args += ["--busy"] if busy else []
        agent_args += [str(port) for port in upstream.ports[:size]]
        async with running_child(
            f"{name}-agents", "bench.fake_agents", *agent_args, workdir=directory
        ) as agents:
            await _wait_counted(paddler, size * upstream.slots, directory, ready_timeout)
            yield Fleet(paddler, agents, size)


async def _wait_counted(
    paddler: RunningPaddler, slots: int, directory: Path, timeout: float
) -> None:
    """Poll the proxy's ``/health`` until it counts ``slots`` slots, idle or not."""
    seen = 0
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{paddler.proxy_url}/health") as response:
                            health = await response.json()
                        seen = health["slots_idle"] + health["slots_processing"]
                        if seen == slots:
                            return
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise RuntimeError(
                f"the balancer counted {seen} of {slots} slots after {timeout:g}s:\n"
                f"{log_tail(directory / 'balancer.log')}"
            ) from None


async def health(session: aiohttp.ClientSession, paddler: RunningPaddler) -> dict[str, int]:
    async with session.get(f"{paddler.proxy_url}/health") as response:
        body: dict[str, int] = await response.json()
        return body
