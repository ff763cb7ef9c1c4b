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
- It returns when ``shutdown`` is set and every part has finished, child stopped and balancer
  told. If one part fails, the others are stopped too and the failure propagates.
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
from paddler.agent.llamacpp_process import LlamaCppProcess
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
            try:
                async with asyncio.TaskGroup() as group:
                    if self.process is not None:
                        group.create_task(self.process.run(shutdown), name="llama.cpp process")
                    group.create_task(self._watch(session, shutdown), name="llama.cpp monitor")
                    group.create_task(self._link(session, shutdown), name="balancer link")
            finally:
                shutdown.set()

    async def _watch(self, session: aiohttp.ClientSession, shutdown: asyncio.Event) -> None:
        config = self._config
        process = self.process
        monitor = LlamaCppMonitor(
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
