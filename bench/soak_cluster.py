"""The soak benchmark's cluster: one balancer and a few agents, each with its own llama.cpp.

Unlike ``paddler cluster``, every process is the benchmark's own child, so that it can kill any
of them with SIGKILL: an agent's llama.cpp (the agent restarts it itself, see
``agent/llamacpp_process``) or an agent (the benchmark starts it again, under the same name; its
llama.cpp, whose stdin then closes, exits with it).

The command lines are built here and nowhere else: ``BALANCER_FLAGS`` and ``AGENT_FLAGS`` are
what to change when the balancer or the agent gains a flag the soak should run with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.processes import free_port, spawn, stop
from paddler.tiny_model import TinyModelShape, ensure_tiny_model

HOST = "127.0.0.1"
SLOTS = 4
API_KEY = "soak-client-key"
"""The clients' key: the soak runs with client authentication on, as production would."""
BALANCER_FLAGS: tuple[str, ...] = (
    "--request-buffer-size=200",
    "--request-buffer-timeout=20",
    f"--api-key={API_KEY}",
)
"""Beyond the ports: what the soak's balancer runs with."""
AGENT_FLAGS: tuple[str, ...] = (
    f"--slots={SLOTS}",
    "--threads=1",
    "--context-size=4096",
    "--monitoring-interval=0.5",
)
"""Beyond the name, model and ports: what each agent runs with."""


def balancer_argv(
    proxy_port: int, management_port: int, flags: tuple[str, ...] = BALANCER_FLAGS
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "paddler",
        "balancer",
        f"--management-host={HOST}",
        f"--management-port={management_port}",
        f"--reverseproxy-host={HOST}",
        f"--reverseproxy-port={proxy_port}",
        *flags,
    ]


def agent_argv(
    name: str, model: Path, management_port: int, flags: tuple[str, ...] = AGENT_FLAGS
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "paddler",
        "agent",
        f"--name={name}",
        f"--model={model}",
        "--local-llamacpp-port=0",
        f"--management-host={HOST}",
        f"--management-port={management_port}",
        *flags,
    ]


@dataclass
class SoakCluster:
    workdir: Path
    servers: int
    proxy_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    balancer: asyncio.subprocess.Process | None = None
    agents: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    model: Path | None = None
    restarts: int = 0
    balancer_flags: tuple[str, ...] = BALANCER_FLAGS
    agent_flags: tuple[str, ...] = AGENT_FLAGS
    model_shape: TinyModelShape | None = None
    """The generated model's shape (default: ``ensure_tiny_model``'s)."""

    @property
    def proxy(self) -> str:
        return f"http://{HOST}:{self.proxy_port}"

    @property
    def management(self) -> str:
        return f"http://{HOST}:{self.management_port}"

    @property
    def balancer_pid(self) -> int:
        assert self.balancer is not None
        return self.balancer.pid

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.model = await asyncio.to_thread(ensure_tiny_model, self.model_shape)
        self.balancer = await spawn(
            *balancer_argv(self.proxy_port, self.management_port, self.balancer_flags),
            log_path=self.workdir / "balancer.log",
        )
        for index in range(1, self.servers + 1):
            await self.start_agent(f"soak-{index}")
        await self.wait_ready(session, timeout=180)

    async def start_agent(self, name: str) -> None:
        assert self.model is not None
        self.agents[name] = await spawn(
            *agent_argv(name, self.model, self.management_port, self.agent_flags),
            log_path=self.workdir / f"agent-{name}.log",
        )

    async def agents_json(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.management}/api/v1/agents") as response:
            response.raise_for_status()
            agents: dict[str, Any] = await response.json()
            return agents

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Until every agent is registered and ok (polled: the readiness endpoint, not a sleep)."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    agents = (await self.agents_json(session))["agents"]
                    ok = {agent["name"] for agent in agents if agent["state"] == "ok"}
                    if ok >= set(self.agents):
                        return
                await asyncio.sleep(0.2)

    def llamacpp_pid(self, name: str) -> int | None:
        """The llama.cpp child of agent ``name``, if it runs."""
        agent = self.agents[name]
        children = _children(agent.pid)
        return children[0] if children else None

    def kill_llamacpp(self, name: str) -> bool:
        pid = self.llamacpp_pid(name)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True

    async def freeze_llamacpp(self, name: str, seconds: float) -> bool:
        """SIGSTOP the agent's llama.cpp for ``seconds``, then SIGCONT it (always)."""
        pid = self.llamacpp_pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        try:
            await asyncio.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return True

    async def kill_agent(self, name: str) -> None:
        """SIGKILL the agent, then start it again under the same name."""
        process = self.agents[name]
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        # Its llama.cpp exits by itself (stdin closed, PDEATHSIG); the new one takes a new port.
        await self.start_agent(name)
        self.restarts += 1

    async def stop(self) -> None:
        for process in self.agents.values():
            await stop(process, timeout=10)
        if self.balancer is not None:
            await stop(self.balancer, timeout=10)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found
