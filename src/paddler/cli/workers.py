"""``paddler balancer --workers N``: the worker processes, started, restarted and stopped.

The balancer's own process holds the fleet (``balancer.fleet_host``); this module starts N
``python -m paddler.cli.worker`` children once it has bound the proxy port, each in a session of
its own (a terminal's Ctrl-C reaches the parent alone, which stops them in order). A child gets
its arguments as a pickle on its standard input: the frozen config, where the fleet is and
which port to join.

A worker that dies (a crash, the OOM killer, ``kill -9``) is started again, after a pause that
doubles up to 30 s while it keeps dying early; the fleet host has already released its
reservations. Three workers in a row that die within 10 s of their start, before any worker
ever listened, mean they cannot start at all: that is fatal (``WorkersFailed``).

At shutdown every worker gets SIGTERM, drains its requests for ``--shutdown-drain-timeout`` and
exits; one still running 5 s after that is killed.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from paddler.config import BalancerConfig
from paddler.lifecycle import wait_or_shutdown

log = logging.getLogger(__name__)

_EARLY = 10.0
"""A worker that exits sooner than this after its start died early."""
_FIRST_PAUSE = 0.5
_LONGEST_PAUSE = 30.0
_FATAL_EARLY_DEATHS = 3
_KILL_GRACE = 5.0


class WorkersFailed(Exception):
    """The workers cannot start (each died at once): nothing would serve the proxy port."""


@dataclass(frozen=True)
class WorkerArguments:
    """What a worker process reads from its standard input."""

    config: BalancerConfig
    fleet_socket: Path
    port: int
    index: int
    log_level: str
    log_format: str


class FleetSocketDirectory:
    """A directory only this user may enter, for the fleet host's Unix socket."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="paddler-fleet-"))
        self.socket = self.path / "fleet.sock"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class WorkerProcesses:
    def __init__(
        self, config: BalancerConfig, fleet_socket: Path, log_level: str, log_format: str
    ) -> None:
        self._config = config
        self._fleet_socket = fleet_socket
        self._log_level = log_level
        self._log_format = log_format
        self._running: dict[int, asyncio.subprocess.Process] = {}
        self.ever_listened = False
        """Set by the caller once every worker listened: early deaths are no longer fatal."""

    async def run(self, port: int, shutdown: asyncio.Event) -> None:
        """Keep ``config.workers`` workers on ``port`` until shutdown, then stop them."""
        async with asyncio.TaskGroup() as workers:
            for index in range(1, self._config.workers + 1):
                workers.create_task(self._keep(index, port, shutdown))

    def pids(self) -> list[int]:
        """The workers running now."""
        return [p.pid for p in self._running.values() if p.returncode is None]

    def hang_up(self) -> None:
        """Pass SIGHUP on (the workers re-read the client keys)."""
        for process in self._running.values():
            if process.returncode is None:
                process.send_signal(signal.SIGHUP)

    async def _keep(self, index: int, port: int, shutdown: asyncio.Event) -> None:
        pause = _FIRST_PAUSE
        early_deaths = 0
        loop = asyncio.get_running_loop()
        while not shutdown.is_set():
            started = loop.time()
            process = await self._start(index, port)
            self._running[index] = process
            exited = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(shutdown.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await self._stop(index, process, exited)
                return
            code = process.returncode
            if loop.time() - started < _EARLY:
                early_deaths += 1
                if early_deaths >= _FATAL_EARLY_DEATHS and not self.ever_listened:
                    raise WorkersFailed(
                        f"worker {index} exited with code {code} {early_deaths} times in a row, "
                        "right after it started (its log lines say why)"
                    )
            else:
                early_deaths, pause = 0, _FIRST_PAUSE
            log.warning(
                "worker %d exited with code %s; starting it again in %gs", index, code, pause
            )
            if await wait_or_shutdown(shutdown, pause):
                return
            pause = min(_LONGEST_PAUSE, pause * 2)

    async def _start(self, index: int, port: int) -> asyncio.subprocess.Process:
        arguments = WorkerArguments(
            self._config, self._fleet_socket, port, index, self._log_level, self._log_format
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "paddler.cli.worker",
            stdin=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(arguments))
        await process.stdin.drain()
        process.stdin.close()
        return process

    async def _stop(
        self, index: int, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._config.shutdown_drain_timeout + _KILL_GRACE):
                await asyncio.shield(exited)
        except TimeoutError:
            log.warning("worker %d did not stop: killing it", index)
            process.kill()
            await exited
