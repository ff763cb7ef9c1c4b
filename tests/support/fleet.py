"""A fleet for end-to-end tests: real llama.cpp servers, a real ``paddler agent`` beside each,
and a balancer in the test's event loop, every agent usable before the test starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agent import running_agent
from tests.support.balancer import RunningBalancer, running_balancer, wait_until
from tests.support.llamacpp import LlamaCppServer, running_llamacpp


@dataclass(frozen=True)
class Server:
    """One llama.cpp server of a fleet: its alias, model file and extra llama.cpp options, and
    the name of its agent (default ``agent-<alias or index>``)."""

    alias: str | None = None
    name: str | None = None
    model: Path | None = None
    extra_args: tuple[str, ...] = ()


@dataclass
class Fleet:
    balancer: RunningBalancer
    servers: list[LlamaCppServer]
    agents: list[asyncio.subprocess.Process]
    names: list[str] = field(default_factory=list)

    def server(self, name: str) -> LlamaCppServer:
        return self.servers[self.names.index(name)]


@contextlib.asynccontextmanager
async def fleet(
    servers: int | Sequence[Server | str | None],
    *,
    slots: int = 2,
    model: Path | None = None,
    token: str | None = None,
    **balancer_options: Any,
) -> AsyncIterator[Fleet]:
    """``servers`` llama.cpp servers (a count, or one ``Server`` or alias each), each with an
    agent named ``agent-<alias or index>``, behind one balancer; all usable on entry."""
    if isinstance(servers, int):
        specs = [Server() for _ in range(servers)]
    else:
        specs = [spec if isinstance(spec, Server) else Server(alias=spec) for spec in servers]
    async with contextlib.AsyncExitStack() as stack:
        running = await stack.enter_async_context(
            running_balancer(management_token=token, **balancer_options)
        )
        result = Fleet(running, [], [])
        for index, spec in enumerate(specs):
            server = await stack.enter_async_context(
                running_llamacpp(
                    spec.model or model,
                    slots=slots,
                    alias=spec.alias,
                    extra_args=spec.extra_args,
                )
            )
            name = spec.name or f"agent-{spec.alias or index}"
            agent = await stack.enter_async_context(
                running_agent(
                    llamacpp_port=server.port,
                    management_port=running.balancer.management_port or 0,
                    name=name,
                    token=token,
                )
            )
            result.servers.append(server)
            result.agents.append(agent)
            result.names.append(name)
        await wait_until(
            lambda: sum(agent.usable() for agent in running.pool.agents()) == len(specs),
            timeout=30,
        )
        yield result
