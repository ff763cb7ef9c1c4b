"""Child processes of the benchmark: started with their log in a file, always stopped and reaped.

Every child gets the environment without ``PADDLER_*`` variables, so that a developer's shell
cannot change what is measured. ``stop`` ends a child whatever state it is in; a child started
with ``own_group`` (nginx, whose master forks workers) has its whole process group killed if
the polite signal is not enough, so that no worker outlives the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path


def child_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("PADDLER_")}


async def spawn(
    *argv: str,
    log_path: Path,
    stdin_pipe: bool = False,
    stdout_pipe: bool = False,
    stderr_pipe: bool = False,
    own_group: bool = False,
) -> asyncio.subprocess.Process:
    """Start ``argv``; whatever is not piped goes to ``log_path``."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
            stderr=asyncio.subprocess.PIPE if stderr_pipe else log,
            env=child_env(),
            start_new_session=own_group,
        )


async def stop(
    process: asyncio.subprocess.Process,
    *,
    signum: signal.Signals = signal.SIGTERM,
    timeout: float = 5.0,
    own_group: bool = False,
) -> None:
    """Close stdin, send ``signum``, then SIGKILL after ``timeout``; reap the child in every case."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await process.wait()
    finally:
        if own_group:
            # The group id is the child's pid (start_new_session); it holds only what it forked.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()


async def read_until(
    stream: asyncio.StreamReader, marker: str, timeout: float, process: asyncio.subprocess.Process
) -> str:
    """Read lines until one contains ``marker``; return that line."""
    async with asyncio.timeout(timeout):
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if marker in text:
                return text
        code = await process.wait()
    raise RuntimeError(f"{marker!r} never came: the process exited with code {code}")


async def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on loopback ``port``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_hop(
    command: Sequence[str], upstream_port: int, log_path: Path, ready_timeout: float = 30.0
) -> AsyncIterator[tuple[str, int]]:
    """Run ``command PORT UPSTREAM_PORT`` (a prototype proxy: ``bench.proxy_floor``) on a free
    port until the block ends; yields its URL and pid once it accepts connections."""
    port = free_port()
    process = await spawn(*command, str(port), str(upstream_port), log_path=log_path)
    try:
        await wait_for_port(port, ready_timeout)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        await stop(process)


def free_port() -> int:
    """A loopback port free right now; for the few programs that cannot report port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit.

    A load generator that holds 10,000 connections needs as many descriptors, and children
    (nginx, the fake upstream) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
