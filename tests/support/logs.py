"""Waiting for log lines instead of sleeping: a handler that wakes waiters on every record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator


class LogWatcher(logging.Handler):
    """Collects one logger's records; ``wait_for`` returns once enough have arrived.

    Records must come from the event loop's thread, as everything in Paddler does.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    def messages(self, level: int, containing: str = "") -> list[str]:
        return [
            record.getMessage()
            for record in self.records
            if record.levelno == level and containing in record.getMessage()
        ]

    async def wait_for(
        self, level: int, count: int = 1, containing: str = "", timeout: float = 10.0
    ) -> list[str]:
        """Wait until ``count`` records of ``level`` (containing the text) have been logged."""
        async with asyncio.timeout(timeout):
            while len(found := self.messages(level, containing)) < count:
                await self._arrived.wait()
        return found


@contextlib.contextmanager
def watching(logger_name: str) -> Iterator[LogWatcher]:
    """Attach a LogWatcher to ``logger_name`` at DEBUG level for the duration of the block."""
    logger = logging.getLogger(logger_name)
    watcher = LogWatcher()
    previous_level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(previous_level)
