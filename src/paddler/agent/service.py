"""The agent service: watch one llama.cpp, optionally run it, and report it to the balancer.

Contract of ``Agent(config).run(shutdown)``:

- With ``config.launch`` set, llama.cpp runs as a supervised child on ``config.local`` (port 0:
  a free port, kept across restarts); otherwise the agent watches the server at ``config.local``.
- Every ``monitoring_interval`` it observes llama.cpp and publishes the result to the status board;
  state transitions are logged once each, not every poll. While its own child is loading, the
  status is ``loading``; while it is restarting, ``unreachable``.
- The balancer link registers ``config.name`` (default: ``<hostname>:<external port>``) with the
  external address. An external port of 0 means "the port our llama.cpp child listens on"; the
  link then starts once that child is first ready.
- On ``shutdown`` it deregisters first, so that the balancer sends nothing more. An agent that
  runs its own llama.cpp then lets the requests still running there finish (while llama.cpp
  reports busy slots, up to ``config.shutdown_drain_timeout``) before it stops llama.cpp: an
  autoscaler or systemd stopping a host does not cut its users' streams.
- It returns when every part has finished, child stopped and balancer told. If one part fails,
  the others are stopped too and the failure propagates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import aiohttp

from paddler.agent.balancer_link import BalancerLink
from paddler.agent.interruptible import unless_shutdown
from paddler.agent.llamacpp_monitor import LlamaCppMonitor
from paddler.agent.llamacpp_process import LlamaCppGaveUp, LlamaCppProcess
from paddler.agent.status_board import StatusBoard
from paddler.config import AgentConfig
from paddler.lifecycle import wait_or_shutdown
from paddler.protocol import LlamaCppState, Status

logger = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if config.launch is None and (config.local.port == 0 or config.external.port == 0):
            raise ValueError("port 0 is only meaningful when the agent runs llama.cpp (--model)")
        self._config = config
        self.board = StatusBoard()
        self._monitor: LlamaCppMonitor | None = None
        self.process: LlamaCppProcess | None = None
        if config.launch is not None:
            self.process = LlamaCppProcess(
                config.launch,
                config.local.host,
                config.local.port,
                config.local_llamacpp_api_key,
            )

    async def run(self, shutdown: asyncio.Event) -> None:
        # A small pool: the agent talks to one llama.cpp and one balancer.
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:
            # llama.cpp (and watching it) stops after the balancer was told and the drain ended.
            stop_llamacpp = asyncio.Event()
            try:
                await self._run_parts(session, shutdown, stop_llamacpp)
            except* LlamaCppGaveUp as gave_up:
                raise gave_up.exceptions[0] from None  # one clear reason, not a group
            finally:
                shutdown.set()
                stop_llamacpp.set()

    async def _run_parts(
        self, session: aiohttp.ClientSession, shutdown: asyncio.Event, stop_llamacpp: asyncio.Event
    ) -> None:
        async with asyncio.TaskGroup() as group:
            if self.process is not None:
                group.create_task(self.process.run(stop_llamacpp), name="llama.cpp process")
            group.create_task(self._watch(session, stop_llamacpp), name="llama.cpp monitor")
            group.create_task(
                self._link_then_drain(session, shutdown, stop_llamacpp), name="balancer link"
            )

    async def _link_then_drain(
        self, session: aiohttp.ClientSession, shutdown: asyncio.Event, stop: asyncio.Event
    ) -> None:
        try:
            await self._link(session, shutdown)
            if self.process is not None:
                await self._drain()
        finally:
            stop.set()

    async def _drain(self) -> None:
        """Wait, up to the drain timeout, until our llama.cpp has no request running.

        It reads llama.cpp afresh, not the last report: a request that began a moment ago may
        not be in that report yet.
        """
        timeout = self._config.shutdown_drain_timeout
        monitor = self._monitor
        if monitor is None:
            return
        status = await monitor.observe()
        if status.state is not LlamaCppState.OK or not status.slots_processing:
            return
        logger.info(
            "waiting for %d request(s) running on llama.cpp to finish (up to %gs)",
            status.slots_processing,
            timeout,
        )
        try:
            async with asyncio.timeout(timeout):
                while status.state is LlamaCppState.OK and status.slots_processing:
                    await asyncio.sleep(self._config.monitoring_interval)
                    status = await monitor.observe()
        except TimeoutError:
            logger.warning(
                "%d request(s) still running on llama.cpp after %gs; stopping it anyway",
                status.slots_processing,
                timeout,
            )
        else:
            logger.info("no request is running on llama.cpp any more")

    async def _watch(self, session: aiohttp.ClientSession, shutdown: asyncio.Event) -> None:
        config = self._config
        process = self.process
        monitor = self._monitor = LlamaCppMonitor(
            session,
            (lambda: process.url) if process is not None else config.local.url,
            config.local_llamacpp_api_key,
            config.llamacpp_timeout,
        )
        # Before our own llama.cpp first answers, it will serve this model under this name.
        expected_models = (
            (config.launch.alias or str(config.launch.model),) if config.launch is not None else ()
        )
        seen_generation = 0
        logged: tuple[LlamaCppState, str | None] | None = None
        while not shutdown.is_set():
            if process is not None and process.url is None:
                status = _child_not_serving(process, monitor.last_models or expected_models)
            else:
                if process is not None and process.generation != seen_generation:
                    seen_generation = process.generation
                    monitor.forget()  # a new child: its props may differ
                observed = await unless_shutdown(monitor.observe(), shutdown)
                if observed is None:
                    return
                status = observed
            self.board.publish(status)
            if (status.state, status.error) != logged:
                logged = (status.state, status.error)
                _log_transition(status)
            if await wait_or_shutdown(shutdown, config.monitoring_interval):
                return

    async def _link(self, session: aiohttp.ClientSession, shutdown: asyncio.Event) -> None:
        config = self._config
        external = config.external
        if external.port == 0 and self.process is not None:
            if await unless_shutdown(self.process.wait_ready(), shutdown) is None:
                return
            external = dataclasses.replace(external, port=self.process.port or 0)
        name = config.name or f"{socket.gethostname()}:{external.port}"
        link_config = dataclasses.replace(config, external=external, name=name)
        await BalancerLink(link_config, session, self.board).run(shutdown)


def _child_not_serving(process: LlamaCppProcess, models: tuple[str, ...]) -> Status:
    if process.starting:
        return Status(state=LlamaCppState.LOADING, models=models, error="llama.cpp is starting")
    return Status(
        state=LlamaCppState.UNREACHABLE,
        models=models,
        error="llama.cpp is not running; restarting it",
    )


def _log_transition(status: Status) -> None:
    if status.state is LlamaCppState.OK:
        logger.info(
            "llama.cpp is ok: %d slots, models %s",
            status.slots_total,
            ", ".join(status.models) or "(none reported)",
        )
    elif status.state is LlamaCppState.LOADING:
        logger.info("llama.cpp is loading: %s", status.error)
    else:
        logger.warning("llama.cpp is %s: %s", status.state.value, status.error)
