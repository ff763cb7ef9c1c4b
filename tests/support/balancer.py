"""A balancer running in the test's event loop, and a scripted agent to drive its socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from paddler import protocol
from paddler.balancer.service import Balancer
from paddler.cli.workers import FleetSocketDirectory, WorkerProcesses
from paddler.config import BalancerConfig
from paddler.protocol import LlamaCppState, Status
from tests.support.upstream import fake_upstream, not_found


@dataclass
class RunningBalancer:
    balancer: Balancer
    proxy_url: str
    management_url: str
    workers: WorkerProcesses | None = None

    @property
    def pool(self) -> Any:
        return self.balancer.pool

    async def agents(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with session.get(f"{self.management_url}/api/v1/agents") as response:
            body = await response.json()
            return list(body["agents"])


@contextlib.asynccontextmanager
async def running_balancer(
    tracer_provider: Any = None, **overrides: Any
) -> AsyncIterator[RunningBalancer]:
    """A balancer on ports 0; with ``workers`` above 1, this process holds the fleet and the
    workers are real processes (``cli.workers``), as ``paddler balancer --workers`` runs them."""
    config = replace(BalancerConfig(management_port=0, reverseproxy_port=0), **overrides)
    directory = FleetSocketDirectory() if config.workers > 1 else None
    balancer = Balancer(
        config,
        tracer_provider=tracer_provider,
        fleet_socket=None if directory is None else directory.socket,
    )
    shutdown = asyncio.Event()
    task = asyncio.create_task(balancer.run(shutdown))
    workers: asyncio.Task[None] | None = None
    processes: WorkerProcesses | None = None
    if directory is not None:
        processes = WorkerProcesses(config, directory.socket, "info", "text")
        bound = asyncio.create_task(balancer.proxy_port_bound.wait())
        await asyncio.wait([task, bound], return_when=asyncio.FIRST_COMPLETED)
        if bound.done():
            assert balancer.reverseproxy_port is not None
            workers = asyncio.create_task(processes.run(balancer.reverseproxy_port, shutdown))
    ready = asyncio.create_task(balancer.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    try:
        yield RunningBalancer(
            balancer,
            f"{config.reverseproxy_scheme}://127.0.0.1:{balancer.reverseproxy_port}",
            f"{config.management_scheme}://127.0.0.1:{balancer.management_port}",
            processes,
        )
    finally:
        shutdown.set()
        await task
        if workers is not None:
            await workers
        if directory is not None:
            directory.remove()


def ok(idle: int, processing: int = 0, models: tuple[str, ...] = ()) -> Status:
    return Status(
        state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing, models=models
    )


class ScriptedAgent:
    """Speaks the agent protocol from a test, so that it controls every report."""

    def __init__(
        self, session: aiohttp.ClientSession, management_url: str, token: str | None = None
    ):
        self._session = session
        self._management_url = management_url
        self._url = management_url + protocol.AGENT_SOCKET_PATH
        self._token = token
        self.socket: aiohttp.ClientWebSocketResponse | None = None

    async def register(
        self,
        name: str,
        port: int,
        status: Status,
        host: str = "127.0.0.1",
        *,
        verified: bool = True,
    ) -> str:
        """Register; with ``verified``, return only once the balancer has reached ``port``
        itself (something must answer llama.cpp's ``/health`` there, see ``fake_upstream``)."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self.socket = await self._session.ws_connect(self._url, headers=headers)
        await self.socket.send_str(
            protocol.encode(protocol.Register(name=name, host=host, port=port, status=status))
        )
        reply = protocol.parse_balancer_message(await self.socket.receive_str())
        assert isinstance(reply, protocol.Registered), reply
        if verified:
            await self.verified(reply.agent_id)
        return reply.agent_id

    async def verified(self, agent_id: str) -> None:
        """Wait until the balancer lists ``agent_id`` as verified."""

        async def listed_verified() -> bool:
            async with self._session.get(self._management_url + "/api/v1/agents") as response:
                agents = (await response.json())["agents"]
            return any(agent["id"] == agent_id and agent["verified"] for agent in agents)

        await wait_until(listed_verified)

    async def register_departed(self, name: str, status: Status) -> str:
        """Register a server the balancer verified, and which then stopped listening."""
        async with fake_upstream(not_found) as port:
            return await self.register(name, port, status)

    async def report(self, status: Status) -> None:
        await self.report_raw(protocol.encode(status))

    async def report_raw(self, frame: str) -> None:
        assert self.socket is not None
        await self.socket.send_str(frame)

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


async def wait_until(condition: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll a cheap in-process condition (sync or async) until it holds."""
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)
