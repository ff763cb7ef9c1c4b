"""Start the cluster step by step, supervise it, and stop it in order.

Start-up: the ports are checked before anything starts; the balancer gets ``NOTIFY_SOCKET``
(and no other child does), and the cluster waits for *its* ``READY=1`` before it reads the
management port, where it waits for its own agents to be ``ok``. Only then does it print the
banner. A child that exits meanwhile ends the start-up with one line saying which and why.

Stop (``shutdown``, from Ctrl-C or SIGTERM): first the balancer, which stops taking requests and
lets running ones finish (up to ``shutdown_drain_timeout``); once it has exited, the agents, each
of which stops its llama.cpp. Stopping the agents first would cut every running request.
``hurry`` (a second Ctrl-C) cuts the wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from paddler.cluster.banner import Commands, banner
from paddler.cluster.child import Child
from paddler.cluster.config import ClusterConfig
from paddler.cluster.notify_socket import NotifySocket
from paddler.cluster.ports import HOST, PortUnavailable, check_ports, free_port
from paddler.cluster.progress import Interrupted, Progress, Step

log = logging.getLogger(__name__)

T = TypeVar("T")

_START_TIMEOUT = 180.0
_STOP_TIMEOUT = 15.0
_POLL_INTERVAL = 0.1


class ClusterFailed(Exception):
    """The cluster cannot start, or a process of it died; the message says why, in one line."""


class _Stopped(Interrupted):
    """``shutdown`` came during start-up."""


class Cluster:
    def __init__(
        self,
        config: ClusterConfig,
        progress: Progress | None = None,
        commands: Commands | None = None,
    ) -> None:
        self._config = config
        self._progress = progress or Progress.on_terminal()
        self._commands = commands or Commands.of_this_installation()
        self._balancer: Child | None = None
        self._agents: list[Child] = []
        self._waiting_for = ""
        """What the start-up waits for now, for the message if it never comes."""

    async def run(self, shutdown: asyncio.Event, hurry: asyncio.Event) -> int:
        """Start, print the banner, serve until ``shutdown``, then stop every child in order.

        Returns 0 after an ordered stop, 130 when ``hurry`` cut it short; raises
        ``ClusterFailed`` when a port is taken (before anything starts) or a child died.
        """
        config = self._config
        try:
            check_ports(config.reverseproxy_port, config.management_port)
        except PortUnavailable as error:
            raise ClusterFailed(str(error)) from None
        proxy_port = config.reverseproxy_port or free_port()
        management_port = config.management_port or free_port()
        loop = asyncio.get_running_loop()
        started = loop.time()
        announce_stop = False  # a failed start-up stops quietly: its one line says it all
        try:
            model = await self._start(proxy_port, management_port, shutdown)
            announce_stop = True
            self._progress.say(
                banner(
                    servers=config.servers,
                    slots=config.slots,
                    model=model,
                    alias=config.alias,
                    proxy_port=proxy_port,
                    management_port=management_port,
                    commands=self._commands,
                    took=loop.time() - started,
                )
            )
            await self._supervise(shutdown)
        except _Stopped:
            announce_stop = True
        finally:
            await self._stop(management_port, hurry, announce=announce_stop)
            if announce_stop:
                self._progress.say("Paddler cluster stopped.")
        return 130 if hurry.is_set() else 0

    async def _start(self, proxy_port: int, management_port: int, shutdown: asyncio.Event) -> Path:
        config = self._config
        progress = self._progress
        progress.say(
            f"Starting a Paddler cluster: {config.servers} llama.cpp server(s) "
            f"x {config.slots} slot(s)"
        )
        try:
            async with asyncio.timeout(_START_TIMEOUT) as deadline:
                model = await self._model(shutdown)
                self._waiting_for = "the balancer had not said it was ready"
                env = self._environment()
                with NotifySocket() as notifications:
                    async with progress.step("starting the balancer"):
                        self._balancer = await Child.start(
                            "the balancer",
                            self._balancer_arguments(proxy_port, management_port),
                            {**env, "NOTIFY_SOCKET": notifications.path},
                            progress.log_line,
                        )
                        await self._unless_stopped(notifications.ready(), shutdown)
                for index in range(1, config.servers + 1):
                    progress.say(f"  starting server-{index} (llama.cpp and its agent)")
                    self._agents.append(
                        await Child.start(
                            f"the agent of server-{index}",
                            self._agent_arguments(index, model, management_port),
                            env,
                            progress.log_line,
                        )
                    )
                async with progress.step("waiting for the agents") as step:
                    await self._unless_stopped(self._agents_ready(management_port, step), shutdown)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ClusterFailed(
                f"the cluster was not ready within {_START_TIMEOUT:g} s: {self._waiting_for}"
            ) from None
        return model

    async def _model(self, shutdown: asyncio.Event) -> Path:
        if self._config.model is not None:
            return self._config.model
        from paddler.tiny_model import ensure_tiny_model, tiny_model_file

        if tiny_model_file().exists():  # the step is shown only when the model must be written
            return await asyncio.to_thread(ensure_tiny_model)
        self._waiting_for = "the tiny model was still being written"
        async with self._progress.step("writing the tiny model (first run only)"):
            return await self._unless_stopped(asyncio.to_thread(ensure_tiny_model), shutdown)

    def _environment(self) -> dict[str, str]:
        config = self._config
        env = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
        env.update(
            PADDLER_MANAGEMENT_TOKEN=secrets.token_urlsafe(24),
            PADDLER_LOG_LEVEL=config.log_level,
            PADDLER_LOG_FORMAT=config.log_format,
            PADDLER_EVENT_LOOP=config.event_loop,
        )
        return env

    def _balancer_arguments(self, proxy_port: int, management_port: int) -> list[str]:
        config = self._config
        return [
            "balancer",
            f"--management-host={HOST}",
            f"--management-port={management_port}",
            f"--reverseproxy-host={HOST}",
            f"--reverseproxy-port={proxy_port}",
            f"--request-buffer-size={config.request_buffer_size}",
            f"--request-buffer-timeout={config.request_buffer_timeout}",
            f"--routing={config.routing}",
            f"--prefix-index-memory={config.prefix_index_memory}",
            f"--allow-unknown-models={config.allow_unknown_models}",
            f"--shutdown-drain-timeout={config.shutdown_drain_timeout}",
            "--management-dashboard-enable",  # loopback only, and read-only
        ]

    def _agent_arguments(self, index: int, model: Path, management_port: int) -> list[str]:
        config = self._config
        return [
            "agent",
            f"--name=server-{index}",
            f"--model={model}",
            f"--slots={config.slots}",
            f"--threads={config.threads}",
            "--local-llamacpp-port=0",
            f"--management-host={HOST}",
            f"--management-port={management_port}",
            f"--model-alias={config.alias}",
            f"--context-size={config.context_size}",
            # Requests still running on its llama.cpp once the balancer is gone: direct clients.
            f"--shutdown-drain-timeout={config.shutdown_drain_timeout}",
            *(["--", *config.extra_args] if config.extra_args else []),
        ]

    async def _unless_stopped(self, work: Awaitable[T], shutdown: asyncio.Event) -> T:
        """The result of ``work``, unless ``shutdown`` comes first (``_Stopped``) or a child
        exits first (``ClusterFailed``, saying which child and why)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(shutdown.wait())
        exits = [child.exited for child in self._children()]
        try:
            await asyncio.wait([task, stopped, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (task, stopped):
                waiter.cancel()
            await asyncio.wait([task, stopped])
        if task.done() and not task.cancelled():
            return task.result()
        for child in self._children():
            if not child.running:
                raise ClusterFailed(child.why("during start-up"))
        raise _Stopped

    async def _agents_ready(self, management_port: int, step: Step) -> None:
        names = {f"server-{index}" for index in range(1, self._config.servers + 1)}
        url = f"http://{HOST}:{management_port}/api/v1/agents"
        step.update(f"0 of {len(names)} ready")
        self._waiting_for = "no agent had registered with the balancer"
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, ValueError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            agents = [
                                agent
                                for agent in (await response.json())["agents"]
                                if agent["name"] in names
                            ]
                            ready = sum(agent["state"] == "ok" for agent in agents)
                            step.update(f"{ready} of {len(names)} ready")
                            self._waiting_for = _not_ready(agents, names)
                            if ready == len(names):
                                step.finish(step.detail)
                                return
                await asyncio.sleep(_POLL_INTERVAL)

    async def _supervise(self, shutdown: asyncio.Event) -> None:
        """Until ``shutdown``; a child that exits meanwhile is a ``ClusterFailed``."""
        stopped = asyncio.ensure_future(shutdown.wait())
        try:
            await asyncio.wait(
                [stopped, *(child.exited for child in self._children())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopped.cancel()
            await asyncio.wait([stopped])
        for child in self._children():
            if not child.running:
                raise ClusterFailed(f"{child.why()}; the cluster stopped")

    async def _stop(self, management_port: int, hurry: asyncio.Event, *, announce: bool) -> None:
        """The balancer first, so that running requests finish; then the agents."""
        config = self._config
        balancer, agents = self._balancer, self._agents
        if balancer is not None and balancer.running:
            running = await _requests_running(management_port) if announce else 0
            note = (
                f" (it lets {running} running request(s) finish, up to "
                f"{config.shutdown_drain_timeout:g} s; Ctrl-C again to cut them)"
                if running
                else ""
            )
            await self._stopping(
                "stopping the balancer",
                # Cut short with SIGKILL, not a second SIGTERM: that makes the balancer cancel
                # the handlers it drains, and aiohttp (3.14) then logs an InvalidStateError
                # traceback per request (its handler waiter is set after shutdown gave up on
                # it; cf. Tribler/tribler#8156). The requests are cut either way.
                balancer.stop(
                    config.shutdown_drain_timeout + _STOP_TIMEOUT, hurry, cut=signal.SIGKILL
                ),
                hurry,
                announce,
                note,
            )
        if any(agent.running for agent in agents):
            await self._stopping(
                "stopping the agents and their llama.cpp servers",
                asyncio.gather(
                    *(
                        agent.stop(config.shutdown_drain_timeout + _STOP_TIMEOUT, hurry)
                        for agent in agents
                    )
                ),
                hurry,
                announce,
            )
        # Every child has exited by now; this collects what their output readers returned.
        await asyncio.gather(*(child.exited for child in self._children()), return_exceptions=True)
        self._balancer, self._agents = None, []

    async def _stopping(
        self, text: str, work: Awaitable[Any], hurry: asyncio.Event, announce: bool, note: str = ""
    ) -> None:
        if not announce:
            await work
            return
        async with self._progress.step(text, note) as step:
            await work
            if hurry.is_set():
                step.finish("cut short")

    def _children(self) -> list[Child]:
        return ([self._balancer] if self._balancer is not None else []) + self._agents


def _not_ready(agents: list[dict[str, Any]], names: set[str]) -> str:
    registered = {agent["name"] for agent in agents}
    states = [
        f"{agent['name']} is {agent['state']}" + (f" ({agent['error']})" if agent["error"] else "")
        for agent in sorted(agents, key=lambda agent: str(agent["name"]))
        if agent["state"] != "ok"
    ]
    states += [f"{name} has not registered" for name in sorted(names - registered)]
    return ", ".join(states) or "every agent is ok"


async def _requests_running(management_port: int) -> int:
    """How many requests the balancer is serving now, for the stop message (0 if unknown)."""
    url = f"http://{HOST}:{management_port}/api/v1/agents"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session,
            session.get(url) as response,
        ):
            body = await response.json()
            return sum(int(agent["requests_in_flight"]) for agent in body["agents"])
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, TimeoutError):
        return 0
