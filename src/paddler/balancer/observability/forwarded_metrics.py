"""A worker's request counts, sent to its fleet host, which counts them (``--workers``).

Prometheus' counters and histograms, StatsD and the dashboards' history are the fleet host's
(one ``/metrics`` for the whole balancer). A worker's ``MetricsForwarder`` observes each of its
requests as the host's observers would, and sends one summary when the request ends; the host
``replay``s it into its own observers, hook by hook, in the order the request lived them.

A summary is ``[route, needs_slot, status, outcome, fault, buffered, buffer_wait,
time_to_first_chunk, duration, retries, failures]``. Replayed hooks name no agent (the
host's metrics carry no agent label), and the request log and traces stay in the worker, which
writes them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_mirror import mirror_of
from paddler.balancer.observability.observers import Observer, Observers, Outcome, RequestRecord
from paddler.balancer.proxy.verdict import Fault

_NO_AGENT = mirror_of(["", "(replayed)", "http", "localhost", 1])


class MetricsForwarder(Observer):
    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self._send = send
        self._buffered: set[RequestRecord] = set()
        self._retries: dict[RequestRecord, int] = {}
        self._failures: dict[RequestRecord, list[str]] = {}

    def buffer_wait_started(self, record: RequestRecord) -> None:
        self._buffered.add(record)

    def retried(self, record: RequestRecord, agent: AgentController) -> None:
        self._retries[record] = self._retries.get(record, 0) + 1

    def upstream_failed(self, record: RequestRecord, agent: AgentController, reason: str) -> None:
        self._failures.setdefault(record, []).append(reason)

    def request_finished(self, record: RequestRecord) -> None:
        buffered = record in self._buffered
        if buffered:
            self._buffered.discard(record)
        self._send(
            [
                "done",
                [
                    record.route,
                    record.needs_slot,
                    record.status,
                    None if record.outcome is None else record.outcome.value,
                    None if record.fault is None else record.fault.value,
                    buffered,
                    record.buffer_wait,
                    record.time_to_first_chunk,
                    record.duration,
                    self._retries.pop(record, 0),
                    self._failures.pop(record, []),
                ],
            ]
        )

    def unauthorized(self, path: str) -> None:
        self._send(["unauthorized", path])


def replay(observers: Observers, summary: list[Any]) -> None:
    """Tell ``observers`` what a worker's request lived (see the module docstring)."""
    (
        route,
        needs_slot,
        status,
        outcome,
        fault,
        buffered,
        buffer_wait,
        first_chunk,
        duration,
        retries,
        failures,
    ) = summary
    record = RequestRecord(
        id="",
        method="",
        path="",
        route=str(route),
        needs_slot=bool(needs_slot),
        started=0.0,
        buffer_wait=float(buffer_wait),
        status=None if status is None else int(status),
        outcome=None if outcome is None else Outcome(outcome),
        fault=None if fault is None else Fault(fault),
        first_chunk_at=None if first_chunk is None else float(first_chunk),
        ended=None if duration is None else float(duration),
    )
    if buffered:
        observers.buffer_wait_started(record)
        observers.buffer_wait_ended(record)
    for _ in range(int(retries)):
        observers.retried(record, _NO_AGENT)
    for reason in failures:
        observers.upstream_failed(record, _NO_AGENT, str(reason))
    if record.first_chunk_at is not None:
        observers.first_chunk(record)
    observers.request_finished(record)
