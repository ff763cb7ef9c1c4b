"""Awaiting something that shutdown should cut short."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def unless_shutdown(awaitable: Awaitable[T], shutdown: asyncio.Event) -> T | None:
    """Await ``awaitable``; if shutdown is set first, cancel it and return None.

    Its result wins when both finish in the same tick, so a result is never thrown away.
    Its exceptions propagate; cancelling the caller cancels it too.
    """
    work = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait((work, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # asyncio.wait neither raises the tasks' errors nor swallows our own cancellation.
        for task in (work, stopping):
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))
    return None if work.cancelled() else work.result()
