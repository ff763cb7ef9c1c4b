"""How fast one agent's socket may feed the balancer: a token bucket per socket.

Every frame costs the event loop a parse and a pool update, and a connection that reads many
frames at once applies them all before the loop does anything else: 50,000 queued frames from
one agent held ``/health`` for tens of milliseconds at a time (up to 0.5 s on a busy host). So the
agent's connection (``agent_connection``) takes one token per frame and, with none left, stops
reading, the TCP socket included, until one is due: the agent's own sends block, and the flood
is paid by the flooder. The real agent reports on change
and at least once per interval, and never sends faster than ``STATUS_FRAMES_PER_SECOND`` (see
``paddler.agent.balancer_link``), so it never waits here.

A socket that stays over budget for ``flood_seconds`` in a row is no confused agent; the handler
closes it (1008).

Hand-written: a token bucket is a dozen lines, and the rate-limit libraries (aiolimiter and
others) share one limit across tasks and neither report how long a caller has been throttled.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class FrameBudget:
    """``rate`` frames per second sustained, ``burst`` at once, for one socket."""

    def __init__(
        self,
        rate: float,
        burst: int,
        flood_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or flood_seconds <= 0:
            raise ValueError("a frame budget needs rate > 0, burst >= 1 and flood_seconds > 0")
        self._rate = rate
        self._burst = float(burst)
        self._flood_seconds = flood_seconds
        self._clock = clock
        self._tokens = self._burst
        self._updated = clock()
        self._over_since: float | None = None

    def take(self) -> float:
        """Spend a token for one frame; return how long to wait before applying it (0: now)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        self._tokens -= 1
        if self._tokens > -1e-9:  # float error must not make an agent at the rate wait
            self._tokens = max(self._tokens, 0.0)
            self._over_since = None
            return 0.0
        if self._over_since is None:
            self._over_since = now
        return -self._tokens / self._rate

    def flooding(self) -> bool:
        """Whether the socket has been over budget for ``flood_seconds`` without a pause."""
        return (
            self._over_since is not None and self._clock() - self._over_since >= self._flood_seconds
        )
