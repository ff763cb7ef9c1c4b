"""Runs llama.cpp as a supervised child process, for ``paddler agent --model``.

Contract:

- ``run(shutdown)`` starts ``python -m paddler.agent.llamacpp_child``, waits for its ready line and
  restarts it whenever it exits, after a backoff that doubles up to
  ``launch.restart_backoff_max`` (and starts over once a child has served for a while).
- The port is fixed by the first child: with port 0 it picks a free one and every restart asks for
  that same port, so the address the balancer knows stays valid.
- ``url`` is the base URL while a child serves and ``None`` otherwise; ``generation`` counts the
  children that became ready, and ``wait_ready(after)`` waits for one newer than ``after``.
- ``launch.extra_args`` (llama-server's own options) go to every child after ``--``; they are
  checked at construction, which raises ``LlamaCppOptionError`` for one that no child could take,
  rather than starting children that fail forever.
- A llama.cpp that has never served and fails to start ``max_failed_starts`` times in a row (a
  corrupt or truncated model, too little memory for it) is given up on: ``run`` raises
  ``LlamaCppGaveUp`` naming llama.cpp's reason, instead of restarting forever. Once a child has
  served, later failures are always restarted.
- No child outlives ``run``: on shutdown, failure or cancellation it gets SIGTERM, then SIGKILL
  after ``stop_timeout``. Should this process die without cleaning up, the child still exits: its
  stdin (a pipe nobody writes) reaches end of file, and on Linux the kernel sends it SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
from urllib.parse import urlsplit

from paddler.agent import llamacpp_options
from paddler.agent.backoff import Backoff
from paddler.agent.interruptible import unless_shutdown
from paddler.agent.llamacpp_child import API_KEY_ENV, READY_PREFIX
from paddler.config import Address, LlamaCppLaunch
from paddler.lifecycle import describe_exit, wait_or_shutdown

logger = logging.getLogger(__name__)
# llama.cpp's own log lines, at debug level: they are many, and mostly about loading.
output_logger = logging.getLogger(f"{__name__}.output")

_INITIAL_BACKOFF = 0.25
_STABLE_AFTER = 30.0  # a child that served this long resets the backoff
_LOG_TAIL_LINES = 8
_LINE_LIMIT = 1 << 20
# Hosts a server listens on that a client cannot connect to as such.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class LlamaCppStartFailed(Exception):
    """A child exited, or stayed silent, before it said it was ready."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message.splitlines()[0]
        """llama.cpp's own explanation, in one line."""


class LlamaCppGaveUp(Exception):
    """llama.cpp never started, after several attempts; the message says why, in one line."""


class LlamaCppProcess:
    """Keeps one llama.cpp child running on ``host``:``port`` until shutdown."""

    def __init__(
        self,
        launch: LlamaCppLaunch,
        host: str,
        port: int,
        api_key: str | None,
        *,
        startup_timeout: float = 600.0,
        stop_timeout: float = 5.0,
        max_failed_starts: int = 3,
    ) -> None:
        llamacpp_options.parse(launch.extra_args)
        self._launch = launch
        self._host = host
        self._port = port
        self._api_key = api_key
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._max_failed_starts = max_failed_starts
        self._url: str | None = None
        self._pid: int | None = None
        self._starting = False
        self._generation = 0
        self._changed = asyncio.Event()

    @property
    def url(self) -> str | None:
        """Base URL of the serving child, or None while there is none."""
        return self._url

    @property
    def port(self) -> int | None:
        """The port every child listens on; None until the first child chose it."""
        return self._port or None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def starting(self) -> bool:
        """True while a child runs but has not said it is ready (it is loading the model)."""
        return self._starting

    @property
    def generation(self) -> int:
        """How many children have become ready so far."""
        return self._generation

    async def wait_ready(self, after: int = 0) -> str:
        """Wait until a child newer than generation ``after`` serves; return its URL."""
        while self._generation <= after or self._url is None:
            await self._changed.wait()
        return self._url

    async def run(self, shutdown: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(_INITIAL_BACKOFF, max(self._launch.restart_backoff_max, _INITIAL_BACKOFF))
        failed_starts = 0
        while not shutdown.is_set():
            started = loop.time()
            try:
                exited = await self._run_child(shutdown)
            except LlamaCppStartFailed as failure:
                logger.error("llama.cpp did not start: %s", failure)
                failed_starts += 1
                if self._generation == 0 and failed_starts >= self._max_failed_starts:
                    raise LlamaCppGaveUp(
                        f"llama.cpp did not start ({failed_starts} attempts) on "
                        f"{self._launch.model}: {failure.reason}"
                    ) from None
            else:
                failed_starts = 0
                if not exited:
                    return
            if loop.time() - started >= _STABLE_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            logger.warning("restarting llama.cpp in %.1fs", delay)
            if await wait_or_shutdown(shutdown, delay):
                return

    async def _run_child(self, shutdown: asyncio.Event) -> bool:
        """Run one child; return True if it exited by itself, False if stopped for shutdown."""
        self._set(starting=True)
        process = await asyncio.create_subprocess_exec(
            *self._argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(),
            limit=_LINE_LIMIT,
            # Its own session: a Ctrl-C in our terminal is ours to handle, not the child's.
            start_new_session=True,
        )
        assert process.stdout is not None and process.stderr is not None
        self._set(pid=process.pid, starting=True)
        tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        pumps = [asyncio.create_task(_pump(process.stderr, tail), name="llama.cpp stderr")]
        try:
            url = await unless_shutdown(self._read_ready(process, pumps[0], tail), shutdown)
            if url is None:
                return False
            pumps.append(asyncio.create_task(_pump(process.stdout, tail), name="llama.cpp stdout"))
            self._set(pid=process.pid, url=url)
            logger.info("llama.cpp (pid %d) serves at %s", process.pid, url)
            if await unless_shutdown(process.wait(), shutdown) is None:
                return False
            logger.warning(
                "llama.cpp (pid %d) %s; last log lines:\n%s",
                process.pid,
                describe_exit(process.returncode),
                "\n".join(tail),
            )
            return True
        finally:
            self._set()
            await self._stop(process)
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps)

    async def _read_ready(
        self,
        process: asyncio.subprocess.Process,
        stderr_pump: asyncio.Task[None],
        tail: collections.deque[str],
    ) -> str:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self._startup_timeout):
                while line := await process.stdout.readline():
                    text = line.decode(errors="replace").strip()
                    if text.startswith(f"{READY_PREFIX} "):
                        return self._connectable(text.removeprefix(f"{READY_PREFIX} "))
                    output_logger.debug("%s", text)
                await process.wait()
        except TimeoutError:
            raise LlamaCppStartFailed(
                f"it was not ready within {self._startup_timeout:g}s"
            ) from None
        # Let the last words on stderr arrive: they say why.
        await asyncio.wait((stderr_pump,), timeout=1.0)
        raise LlamaCppStartFailed(
            f"it {describe_exit(process.returncode)} before it was ready; last log lines:\n"
            + "\n".join(tail),
            reason=_reason(tail) or f"it {describe_exit(process.returncode)}",
        )

    def _connectable(self, url: str) -> str:
        """The URL to reach the child at, and remember its port for restarts."""
        parts = urlsplit(url)
        if parts.port is None:
            raise LlamaCppStartFailed(f"its ready line has no port: {url!r}")
        host = parts.hostname or ""
        self._port = parts.port
        return Address(parts.scheme or "http", _WILDCARD_HOSTS.get(host, host), parts.port).url

    def _argv(self) -> list[str]:
        launch = self._launch
        argv = [
            sys.executable,
            "-m",
            "paddler.agent.llamacpp_child",
            "--model",
            str(launch.model),
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--slots",
            str(launch.slots),
            "--ctx",
            str(launch.total_context),
            "--threads",
            str(launch.threads),
            "--cache-ram-mib",
            str(launch.cache_ram_mib),
            "--parent-pid",
            str(os.getpid()),
        ]
        if launch.alias:
            argv += ["--alias", launch.alias]
        if launch.extra_args:
            argv += ["--", *launch.extra_args]
        return argv

    def _env(self) -> dict[str, str]:
        # The key travels in the environment: a command line is readable by every local user.
        env = {name: value for name, value in os.environ.items() if name != API_KEY_ENV}
        if self._api_key:
            env[API_KEY_ENV] = self._api_key
        return env

    def _set(self, pid: int | None = None, url: str | None = None, starting: bool = False) -> None:
        if url is not None:
            self._generation += 1
        self._pid, self._url, self._starting = pid, url, starting
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        if process.stdin is not None:
            process.stdin.close()  # end of file is the child's own cue to exit
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(self._stop_timeout):
                await process.wait()
        except TimeoutError:
            logger.warning(
                "llama.cpp (pid %d) ignored SIGTERM for %gs; killing it",
                process.pid,
                self._stop_timeout,
            )
        finally:
            # Also reached when we are cancelled while waiting: the child must not survive us.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def _pump(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Log a child's output line by line, keeping the last few lines for error reports."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            continue  # a line longer than the limit: readline dropped it, carry on
        if not line:
            return
        text = line.decode(errors="replace").rstrip()
        tail.append(text)
        output_logger.debug("%s", text)


def _reason(tail: collections.deque[str]) -> str | None:
    """The line of llama.cpp's log that says why it stopped, if there is one."""
    lines = [line for line in tail if line.strip()]
    for line in lines:
        if "error loading model" in line:
            return line.split("error loading model:", 1)[-1].strip() or line
    errors = [line for line in lines if " E " in line]
    return (errors[-1] if errors else lines[-1] if lines else None) or None
