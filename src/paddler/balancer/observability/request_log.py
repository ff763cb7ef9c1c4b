"""One log line per request: its id, the agent chosen, the buffer wait and the outcome.

The line reads well as text, and carries the same facts as structured fields (the record's
attributes, as ``extra`` would set them), which ``--log-format json`` writes out as JSON keys.

Every request logs a line, so the line is made cheaply: its text with one f-string, and, when
the one handler the line reaches can write it from its fields alone (the text format's
``cli.log_stream`` handler, no filter), no record at all. Otherwise its ``LogRecord`` is made
without ``Logger.log``'s general case (a ``%`` of the arguments, ``extra`` checked
key by key, the caller's file name split); it is handed to the logger's ``handle``, so that
levels, filters, propagation and every handler apply as to any record. Measured with callgrind
(``python -m bench.profile_proxy instructions``, the balancer with and without this observer):
126 k instructions a small request with ``Logger.log``, ``extra`` and the standard formatter's
general case, 75 k now, of which about 35 k are ``logging``'s own handling and the write.
"""

from __future__ import annotations

import asyncio
import logging
import time

from paddler.balancer.observability.observers import Observer, RequestRecord
from paddler.balancer.proxy.verdict import Fault

log = logging.getLogger("paddler.requests")

_PER_LINE = ("msg", "args", "levelname", "levelno", "created", "msecs", "relativeCreated")
"""What a record of this logger holds that changes from line to line (the request's fields
aside); the rest is the same for every line, and is copied from one record made at the first."""
_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "outcome",
    "fault",
    "agent",
    "key_id",
    "attempts",
    "buffer_wait_ms",
    "time_to_first_chunk_ms",
    "duration_ms",
)
"""The request's facts, as attributes of its record (``--log-format json``'s keys)."""


class RequestLog(Observer):
    def __init__(self) -> None:
        self._template: dict[str, object] | None = None
        """Every attribute of a line's record, those of the line set to None."""
        self._start = 0.0
        """``logging``'s start, in seconds: a record's ``relativeCreated`` counts from it."""
        self._task_names = False
        """Whether records name their task (Python 3.12's ``logging.logAsyncioTasks``)."""

    def request_finished(self, record: RequestRecord) -> None:
        failed = record.failed
        level, levelname = (logging.WARNING, "WARNING") if failed else (logging.INFO, "INFO")
        if not log.isEnabledFor(level):
            return  # nothing formatted for a line nobody reads (--log-level warning)
        agent = record.agent.name if record.agent is not None else None
        outcome = record.outcome.value if record.outcome is not None else None
        fault = record.fault.value if record.fault is not None else None
        status = record.status
        key_id = record.key_id
        started = record.started
        first_chunk_at = record.first_chunk_at
        ended = record.ended
        # Milliseconds to one decimal, as round(ms, 1) prints them (below 10^15 ms): formatted
        # once, where round() and then %s would convert each number to decimal twice.
        buffered = f"{record.buffer_wait * 1000:.1f}"
        first_chunk = "-" if first_chunk_at is None else f"{(first_chunk_at - started) * 1000:.1f}"
        duration = "None" if ended is None else f"{(ended - started) * 1000:.1f}"
        own_fault = (
            " (the request's own fault)"
            if record.fault is Fault.REQUEST and (status or 0) >= 400
            else ""
        )
        key = f", key {key_id}" if key_id is not None else ""
        line = (
            f"request {record.id} {record.method} {record.path} -> "
            f"{status if status is not None else '-'} {outcome}{own_fault} "
            f"via {agent or 'no agent'}: {duration} ms (buffered {buffered} ms, "
            f"first chunk {first_chunk} ms, "
            f"{record.attempts:d} attempt(s){key})"
        )
        now = time.time()
        # The common case: one handler, whose line is made of the message alone (the text
        # format): written without a record (see ``cli.log_stream``).
        handler = _only_handler()
        if handler is not None:
            write_plain = getattr(handler, "write_plain", None)
            if write_plain is not None and write_plain(now, level, levelname, log.name, line):
                return
        # A copy of a dictionary that has every key already: no key is added, so it is never
        # grown (adding the 20 keys below to the shared ones grew it twice).
        fields = (self._template if self._template is not None else self._first()).copy()
        fields["msg"] = line
        fields["levelname"] = levelname
        fields["levelno"] = level
        fields["created"] = now
        fields["msecs"] = int((now - int(now)) * 1000) + 0.0
        fields["relativeCreated"] = (now - self._start) * 1000
        fields["request_id"] = record.id
        fields["method"] = record.method
        fields["path"] = record.path
        fields["status"] = status
        fields["outcome"] = outcome
        fields["fault"] = fault
        fields["agent"] = agent
        fields["key_id"] = key_id
        fields["attempts"] = record.attempts
        fields["buffer_wait_ms"] = float(buffered)
        fields["time_to_first_chunk_ms"] = None if first_chunk_at is None else float(first_chunk)
        fields["duration_ms"] = None if ended is None else float(duration)
        if self._task_names:
            task = asyncio.current_task()
            fields["taskName"] = task.get_name() if task is not None else None
        entry = logging.LogRecord.__new__(logging.LogRecord)
        entry.__dict__ = fields
        log.handle(entry)

    def _first(self) -> dict[str, object]:
        """What every line's record shares, from a record made as ``Logger.log`` makes one (at
        the first line, so that ``logging``'s settings of the process apply)."""
        first = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, "", (), None)
        self._start = first.created - first.relativeCreated / 1000
        template: dict[str, object] = dict.fromkeys(_PER_LINE)
        template.update(
            (name, value) for name, value in first.__dict__.items() if name not in _PER_LINE
        )
        template["args"] = ()
        template.update(dict.fromkeys(_FIELDS))
        self._task_names = template.get("taskName") is not None
        self._template = template
        return template


def _only_handler() -> logging.Handler | None:
    """The one handler a line of ``log`` reaches, if it reaches one alone and no logger on
    the way filters it; None otherwise (then the record goes through ``Logger.handle``)."""
    if log.disabled:
        return None
    found: logging.Handler | None = None
    logger: logging.Logger | None = log
    while logger is not None:
        if logger.filters:
            return None
        for handler in logger.handlers:
            if found is not None:
                return None
            found = handler
        if not logger.propagate:
            break
        logger = logger.parent
    return found
