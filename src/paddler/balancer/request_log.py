"""One log line per request: its id, the agent chosen, the buffer wait and the outcome.

The line reads well as text, and carries the same facts as structured fields (``extra``), which
``--log-format json`` writes out as JSON keys.
"""

from __future__ import annotations

import logging

from paddler.balancer.observers import Observer, RequestRecord
from paddler.balancer.verdict import Fault

log = logging.getLogger("paddler.requests")


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class RequestLog(Observer):
    def request_finished(self, record: RequestRecord) -> None:
        level = logging.WARNING if record.failed else logging.INFO
        if not log.isEnabledFor(level):
            return  # nothing formatted for a line nobody reads (--log-level warning)
        agent = record.agent.name if record.agent is not None else None
        fields = {
            "request_id": record.id,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "outcome": record.outcome.value if record.outcome else None,
            "fault": record.fault.value if record.fault else None,
            "agent": agent,
            "key_id": record.key_id,
            "attempts": record.attempts,
            "buffer_wait_ms": _milliseconds(record.buffer_wait),
            "time_to_first_chunk_ms": _milliseconds(record.time_to_first_chunk),
            "duration_ms": _milliseconds(record.duration),
        }
        outcome = str(fields["outcome"])
        if record.fault is Fault.REQUEST and (record.status or 0) >= 400:
            outcome += " (the request's own fault)"
        key = f", key {record.key_id}" if record.key_id is not None else ""
        log.log(
            level,
            "request %s %s %s -> %s %s via %s: %s ms (buffered %s ms, first chunk %s ms, %d attempt(s)%s)",
            record.id,
            record.method,
            record.path,
            record.status if record.status is not None else "-",
            outcome,
            agent or "no agent",
            fields["duration_ms"],
            fields["buffer_wait_ms"],
            fields["time_to_first_chunk_ms"] if record.first_chunk_at is not None else "-",
            record.attempts,
            key,
            extra=fields,
        )
