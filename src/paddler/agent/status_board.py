"""The latest observation of llama.cpp, shared by the monitoring loop and the balancer link.

One writer (the monitoring loop) publishes; readers wait for something newer than the version
they last saw. Everything runs on one event loop, so there is no lock: ``publish`` swaps the
version, the status and the wake-up event between awaits.
"""

from __future__ import annotations

import asyncio

from paddler.protocol import Status


class StatusBoard:
    """Holds the newest ``Status`` and wakes waiters when it changes.

    Versions start at 0 (nothing published) and grow by one with each *different* status, so a
    reader that remembers the version it acted on never misses a change and never wakes for a
    repeat of the same observation.
    """

    def __init__(self) -> None:
        self._version = 0
        self._latest: Status | None = None
        self._changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    @property
    def latest(self) -> Status | None:
        return self._latest

    def publish(self, status: Status) -> bool:
        """Record ``status``; return True (and wake waiters) if it differs from the latest."""
        if status == self._latest:
            return False
        self._latest = status
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def current(self) -> tuple[int, Status]:
        """The latest version and status; raises LookupError before the first publish."""
        if self._latest is None:
            raise LookupError("no status has been published yet")
        return self._version, self._latest

    async def newer_than(self, version: int) -> tuple[int, Status]:
        """Wait until a status newer than ``version`` is published, and return it."""
        while self._version <= version:
            await self._changed.wait()
        return self.current()
