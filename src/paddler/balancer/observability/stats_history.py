"""The last ten minutes of the balancer, second by second, for dashboards.

For each second: the requests that finished in it, how many of them were errors, and a sample of
the requests waiting in the buffer and of the fleet's slots (processing, and the total of usable
agents, as in ``/health``). ``StatsHistory`` is an observer (it counts each request in the second
it finished) and a service (``run`` samples the buffer and the fleet once a second). The slots
are the fleet view's totals, which at 1,000 agents may be up to a few tenths of a second old (see
``fleet_view``): a one-second chart does not show the difference.

Memory is fixed: one bucket per second in a ring of ``window + 1`` buckets (the seconds served,
plus the one in progress), however long the balancer runs.

``GET /api/v1/stats`` serves ``as_json()``; the terminal and web dashboards read it::

    {"interval_seconds": 1, "window_seconds": 600,
     "series": [{"t": 1790000000, "requests": 12, "errors": 1, "requests_buffered": 3,
                 "slots_processing": 8, "slots_total": 8}, ...]}

``series`` holds complete seconds only, oldest first, at most ``window`` of them, starting no
earlier than the balancer did: an entry never changes once it has been served. ``t`` is the
second's start, in Unix seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paddler.balancer.fleet.fleet_view import FleetTotals, FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.observability.observers import Observer, RequestRecord
from paddler.lifecycle import wait_or_shutdown

INTERVAL_SECONDS = 1
WINDOW_SECONDS = 600


def is_error(record: RequestRecord) -> bool:
    """Whether a finished request counts as an error on the dashboards."""
    return record.failed


@dataclass(slots=True)
class Second:
    """One second of history; the gauges are the last sample taken in that second."""

    t: int
    requests: int = 0
    errors: int = 0
    requests_buffered: int = 0
    slots_processing: int = 0
    slots_total: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "t": self.t,
            "requests": self.requests,
            "errors": self.errors,
            "requests_buffered": self.requests_buffered,
            "slots_processing": self.slots_processing,
            "slots_total": self.slots_total,
        }


class StatsHistory(Observer):
    def __init__(
        self,
        view: FleetView,
        buffer: RequestBuffer,
        *,
        window: int = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1:
            raise ValueError("the window must hold at least one second")
        self._view = view
        self._buffer = buffer
        self._window = window
        self._clock = clock
        self._ring: list[Second | None] = [None] * (window + 1)
        self._started = int(clock())
        # The latest sample, carried into seconds that have none of their own yet (a second
        # that starts with a finished request, or one the event loop was too busy to sample).
        self._gauges = (0, 0, 0)
        self._encoded: tuple[int, bytes] | None = None
        self._current = Second(-1)
        """The bucket found last: the second's, for every request that finishes in it."""

    @property
    def window(self) -> int:
        return self._window

    def request_finished(self, record: RequestRecord) -> None:
        t = int(self._clock())
        bucket = self._current
        if bucket.t != t:
            bucket = self._bucket(t)
        bucket.requests += 1
        if is_error(record):
            bucket.errors += 1

    def sample(self, fleet: FleetTotals) -> None:
        """Record the buffer now and ``fleet``'s slots in the current second."""
        self._gauges = (self._buffer.waiting, fleet.slots_processing, fleet.slots_total)
        bucket = self._bucket(int(self._clock()))
        bucket.requests_buffered, bucket.slots_processing, bucket.slots_total = self._gauges

    async def run(self, shutdown: asyncio.Event) -> None:
        """Sample once a second, just after each second starts, until shutdown."""
        while True:
            self.sample(await self._view.totals())
            until_next_second = 1.0 - self._clock() % 1.0
            if await wait_or_shutdown(shutdown, until_next_second + 0.005):
                return

    def series(self) -> list[dict[str, int]]:
        """The complete seconds of the window, oldest first, as new dicts.

        A second with no bucket (the event loop was too busy to sample it) counts no request
        and repeats the gauges of the second before it.
        """
        now = int(self._clock())
        seconds: list[dict[str, int]] = []
        previous: Second | None = None
        for t in range(max(self._started, now - self._window), now):
            bucket = self._ring[t % len(self._ring)]
            if bucket is None or bucket.t != t:
                bucket = Second(t) if previous is None else _carried(previous, t)
            seconds.append(bucket.as_json())
            previous = bucket
        return seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "interval_seconds": INTERVAL_SECONDS,
            "window_seconds": self._window,
            "series": self.series(),
        }

    def encoded(self) -> bytes:
        """``as_json()`` as JSON. The series changes only when a second ends, so it is encoded
        at most once a second, however many dashboards poll it."""
        now = int(self._clock())
        if self._encoded is None or self._encoded[0] != now:
            self._encoded = (now, json.dumps(self.as_json(), separators=(",", ":")).encode())
        return self._encoded[1]

    def _bucket(self, t: int) -> Second:
        index = t % len(self._ring)
        bucket = self._ring[index]
        if bucket is None or bucket.t != t:
            buffered, processing, total = self._gauges
            bucket = Second(t, 0, 0, buffered, processing, total)
            self._ring[index] = bucket
        self._current = bucket
        return bucket


def _carried(previous: Second, t: int) -> Second:
    """Second ``t`` with no request, and the gauges of ``previous``."""
    return Second(
        t, 0, 0, previous.requests_buffered, previous.slots_processing, previous.slots_total
    )
