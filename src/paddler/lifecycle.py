"""Waiting inside services.

Every long-running part of Paddler is a service: an object with ``async def run(shutdown)`` that
returns once ``shutdown`` (an ``asyncio.Event``) is set and it has finished its own cleanup.
Services that belong together run in one ``asyncio.TaskGroup``, so that the first one to fail
stops the others.
"""

from __future__ import annotations

import asyncio
import signal


async def wait_or_shutdown(shutdown: asyncio.Event, seconds: float) -> bool:
    """Sleep for ``seconds`` or until shutdown; return True if shutting down."""
    try:
        async with asyncio.timeout(seconds):
            await shutdown.wait()
    except TimeoutError:
        return False
    return True


def describe_exit(returncode: int | None) -> str:
    """How a child process ended, in words: "exited with code 1", "was killed by SIGKILL"."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"
