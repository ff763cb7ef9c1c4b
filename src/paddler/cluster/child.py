"""One process of the cluster: ``python -m paddler <command>``, supervised by the cluster.

- It runs in a session of its own, so that a Ctrl-C on the terminal reaches the cluster alone,
  which then stops its children in order.
- It dies with the cluster: on Linux the kernel sends it SIGTERM when the cluster dies
  (PR_SET_PDEATHSIG), so even a SIGKILLed cluster leaves no orphan behind.
- Its output (its log) is forwarded line by line to the cluster's stderr, and its last line is
  kept: when a child dies, that line usually says why (``cannot listen on ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable

from paddler.lifecycle import describe_exit

_LINE_LIMIT = 1 << 20
# The text format of ``paddler.cli.process.configure_logging``: time, level, logger, message.
_TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: (?P<message>.*)$")
_KILL_AFTER = 5.0


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux to SIGTERM it when we die."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def log_message(line: str) -> str:
    """The message of a log line, without its time, level and logger (text or JSON format),
    or a command-line error without its ``Error:``."""
    line = line.strip().removeprefix("Error: ")
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            message = record.get("message") if isinstance(record, dict) else None
            if isinstance(message, str):
                return message
    match = _TEXT_LOG_LINE.match(line)
    return match.group("message") if match else line


class Child:
    """A started child; ``exited`` completes once it has exited and its output is read."""

    def __init__(
        self, role: str, process: asyncio.subprocess.Process, on_line: Callable[[bytes], None]
    ) -> None:
        self.role = role
        self.process = process
        self.last_line = ""
        self._on_line = on_line
        self.exited: asyncio.Task[int] = asyncio.create_task(self._run(), name=role)

    @classmethod
    async def start(
        cls,
        role: str,
        arguments: list[str],
        env: dict[str, str],
        on_line: Callable[[bytes], None],
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "paddler",
            *arguments,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            limit=_LINE_LIMIT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return cls(role, process, on_line)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def why(self, when: str = "") -> str:
        """How it ended (``when``: "during start-up", say) and the message of its last line."""
        returncode = self.process.returncode
        how = describe_exit(returncode)
        said = " ".join(part for part in (self.role, how, when) if part)
        # After an error exit the last line says why; after a signal it is unrelated.
        message = log_message(self.last_line) if returncode is not None and returncode > 0 else ""
        return f"{said}: {message}" if message else said

    def send(self, signum: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(
        self, grace: float, hurry: asyncio.Event, cut: signal.Signals = signal.SIGTERM
    ) -> None:
        """SIGTERM, then wait up to ``grace`` seconds for it to exit. Once ``hurry`` is set (now
        or while waiting), or after ``grace``, ``cut``: a second SIGTERM makes Paddler's
        commands exit at once, cutting what still runs. SIGKILL if it is ignored for a few
        seconds."""
        self.send(signal.SIGTERM)
        if not hurry.is_set():
            hurried = asyncio.ensure_future(hurry.wait())
            try:
                await asyncio.wait(
                    [self.exited, hurried], timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                hurried.cancel()
                await asyncio.wait([hurried])
            if self.exited.done():
                return
        self.send(cut)
        await asyncio.wait([self.exited], timeout=_KILL_AFTER)
        if not self.exited.done():
            self.send(signal.SIGKILL)
            await self.exited

    async def _run(self) -> int:
        stream = self.process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                continue  # longer than the limit: readline dropped it
            if not line:
                break
            if line.strip():
                self.last_line = line.decode(errors="replace")
            self._on_line(line)
        return await self.process.wait()
