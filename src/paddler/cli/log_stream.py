"""Where log lines go: standard error; the request log's flushed once per loop iteration.

The balancer logs a line per request. ``logging.StreamHandler`` on ``sys.stderr`` (which is
line-buffered) makes a ``write`` system call for each: one of a small request's six. This
handler keeps its own buffer on the same file descriptor and flushes it with a callback at the
end of the event loop's iteration that logged: the lines of every request answered in that
iteration go out in one ``write``, a moment (one iteration, well under a millisecond when idle)
after they were made. At 16 connections that is 3.0 writes per small request before, 2.1 after
(``python -m bench.profile_proxy syscalls``; the other two are the request to llama.cpp and the
answer). Only the loggers named ``batched`` (the request log) wait so; any other line goes out
at once, with those before it, so that what a process says of its life ("listening",
"stopped") is written before it tells another process (``--workers``' host reads a worker's
readiness from its socket, not from its log).

``write_plain`` writes a line from its fields alone, when the handler would make exactly that
line of a record (``request_log`` makes no record for it then).

Outside the loop's thread, before the loop runs and after it stops, each line is flushed at
once, as ``StreamHandler`` does. A process killed with SIGKILL loses at most the lines of its
last iteration; one that exits flushes them (``logging.shutdown``). Hand-written because no
logging library offers a flush tied to an asyncio loop; ``logging.handlers.MemoryHandler``
flushes by count, which would hold the lines of a quiet balancer indefinitely.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterable

_BUFFER_BYTES = 64 * 1024
"""What one iteration's lines may take before they go out anyway."""


class IterationFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, fd: int = 2, batched: Iterable[str] = ("paddler.requests",)) -> None:
        """``batched``: the loggers whose lines wait for the end of the loop's iteration."""
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(
            io.BufferedWriter(raw, _BUFFER_BYTES),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=False,
        )
        super().__init__(stream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._scheduled = False
        self._batched = frozenset(batched)
        self._at_once = False

    def emit(self, record: logging.LogRecord) -> None:
        self._at_once = record.name not in self._batched
        try:
            super().emit(record)
        finally:
            self._at_once = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush on ``loop``'s iterations from now on (call from the loop's thread)."""
        self._loop = loop
        self._thread = threading.get_ident()

    def flush(self) -> None:
        """Called by ``emit`` after each line: schedule the flush, or flush now off the loop."""
        loop = self._loop
        if (
            self._at_once
            or loop is None
            or threading.get_ident() != self._thread
            or not loop.is_running()
        ):
            self.flush_now()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._scheduled = False
        super().flush()

    def write_plain(
        self, created: float, levelno: int, levelname: str, name: str, message: str
    ) -> bool:
        """Write the line of a record with these fields as ``handle`` would, without the
        record, if nothing but the formatter's layout makes it (no filter, a formatter with
        ``plain_line``, as ``OneLineFormatter``); False if ``handle`` must have the record."""
        if self.filters or levelno < self.level:
            return False
        plain_line = getattr(self.formatter, "plain_line", None)
        line = plain_line(created, levelname, name, message) if plain_line else None
        if line is None:
            return False
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:
            return False  # handle() tries again, and reports the failure as logging does
        finally:
            self.release()
        return True


def bind_to_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make the root logger's ``IterationFlushedHandler`` (if it has one) flush on ``loop``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, IterationFlushedHandler):
            handler.bind(loop)
