"""A benchmark helper process steered over its stdin and stdout, one JSON line each way.

The scale benchmark's load comes from helper processes of its own (the fast upstream, the
simulated agents, the held requests), so that their CPU is counted apart from the proxy's and
none of them shares an event loop with the probes that time the proxy. Each one:

- prints one JSON line when it is ready (what it bound, for example);
- then answers each command line on its stdin with exactly one JSON line on its stdout;
- exits when its stdin reaches end of file: when the parent closes it, or dies. So no helper
  outlives the benchmark, whatever happens to it.

Anything larger than a few kilobytes goes through a file named in the command, not the pipe.
A helper runs on uvloop when it is importable: it must cost less than what it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import log_tail, spawn, stop

Handler = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    ready: dict[str, Any]
    """The helper's first line."""
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ask(self, command: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send ``command``; return the helper's answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        try:
            async with asyncio.timeout(timeout):
                await self.process.stdin.drain()
                line = await self.process.stdout.readline()
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not answer {command!r} in {timeout:g}s") from None
        if not line:
            raise RuntimeError(f"{self.name} exited:\n{log_tail(self.log_path)}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name} could not {command!r}: {answer['error']}")
        return answer


@contextlib.asynccontextmanager
async def running_child(
    name: str, module: str, *args: str, workdir: Path, ready_timeout: float = 60.0
) -> AsyncIterator[Child]:
    """Run ``python -m module args`` until the block ends; ready once it printed its line."""
    log_path = workdir / f"{name}.log"
    process = await spawn(
        sys.executable, "-m", module, *args, log_path=log_path, stdin_pipe=True, stdout_pipe=True
    )
    try:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(ready_timeout):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"{name} did not start:\n{log_tail(log_path)}")
        yield Child(name, process, json.loads(line), log_path)
    finally:
        await stop(process)


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve_commands(handle: Handler) -> None:
    """Answer each line of stdin with ``handle``'s dict (or ``{"error": ...}``) until end of file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if not command:
            continue
        try:
            reply = await handle(command)
        except (ValueError, KeyError, OSError) as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        answer(reply)


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop if it is importable, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
