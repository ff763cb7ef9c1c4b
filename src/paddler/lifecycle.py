"""Services and their shared shutdown.

Every long-running part of Paddler is a service: an object with ``async def run(shutdown)`` that
returns once ``shutdown`` is set and it has finished its own cleanup. Services that belong together
run in one ``asyncio.TaskGroup``, so that the first one to fail stops the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol


class Service(Protocol):
    async def run(self, shutdown: asyncio.Event) -> None: ...


async def run_together(services: Iterable[Service], shutdown: asyncio.Event) -> None:
    """Run services until all have returned; if one fails, shut the others down too."""
    try:
        async with asyncio.TaskGroup() as group:
            for service in services:
                group.create_task(service.run(shutdown), name=type(service).__name__)
    finally:
        shutdown.set()


async def wait_or_shutdown(shutdown: asyncio.Event, seconds: float) -> bool:
    """Sleep for ``seconds`` or until shutdown; return True if shutting down."""
    try:
        async with asyncio.timeout(seconds):
            await shutdown.wait()
    except TimeoutError:
        return False
    return True
