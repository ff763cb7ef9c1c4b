"""The fleet as its readers see it: one immutable reading, shared, whose cost stays off the
request path.

The readers are ``GET /metrics``, ``GET /api/v1/agents`` (which both dashboards poll),
``GET /api/v1/autoscaling``, and the stats history's and StatsD's ticks. Each used to take a
pool snapshot of its own, in one piece, on the event loop that also serves requests. At 1,000
agents one snapshot took 6-8 ms, ``/api/v1/agents`` 14 ms and ``/metrics`` 48 ms, and every
request that arrived meanwhile waited (numbers below). Now:

- **Shared.** A reading is taken once and handed to every reader that asks while it is
  current. What readers make of it (the agents JSON, the per-agent Prometheus lines) is made
  once per reading too (``PerReading``), however many clients ask, and at the same time.
- **Sliced.** Taking a reading, and encoding it, runs in slices of about ``SLICE_SECONDS`` of
  loop time, with the loop free for requests between slices. Each agent is read as it was at
  its slice (its ``AgentSnapshot``); the totals are the sums over the agents of the reading, so
  they always add up, and equal what ``AgentControllerPool.snapshot`` counts (usable agents
  only). An agent removed during a reading is left out; one registered during it shows in the
  next.
- **Budgeted.** A reading is reused until the loop time it cost (taking it, and encoding it
  for whoever asked) is ``BUDGET`` of the time since it was taken: readers, however many and
  however often they poll, take at most about 2% of the loop. So a reading is as fresh as that
  allows: at 1,000 agents it costs about 15 ms and is reused for up to about 0.75 s, which is
  finer than a dashboard's one-second poll and far finer than a Prometheus scrape interval. A
  reading that cost less than ``FRESH_BELOW`` (a fleet of a few dozen agents) is never reused:
  a small fleet is read exactly as it is, as before.

Readers that need only the totals (the stats and StatsD ticks, the autoscaling advice) ask
``totals()``: the pool's own, live, which its capacity index keeps as agents change (O(1), as
for ``/health``). The stats tick, once a second, used to take a whole snapshot: 17 µs of the
balancer's CPU for each of 1,000 agents' reports (see ``bench.report_load``).

What is cheap and changes with every request is not part of a reading: readers add the
buffer's ``waiting`` themselves, at the moment they answer.

Measured with ``python -m bench.fleet_readers 1000`` (1,000 agents, 100 small proxied requests
a second, one reader polled 5 times a second, two cores shared with other work). "Longest" is
the longest the loop ran one callback, in CPU time. After, it is always a proxied request: the
pool's pick, which scans the fleet (not the readers' cost); the readers' own longest slice is
given beside it. "p99" is the small requests' latency.

- no reader (the stats and StatsD ticks only): longest 12 ms (the stats tick) before, 3.3 ms
  after (slice 0.5 ms); p99 17 ms before, 9.5 ms after;
- ``/metrics``: longest 115 ms, with garbage collections of 40 ms, before; 5.3 ms (slice
  1.75 ms, p99 0.8 ms) after; p50 21 ms and p99 165 ms before, 4.0 and 11 ms after;
- ``/api/v1/agents``: longest 51 ms (GC 30 ms) before, 6.3 ms (slice 1.2 ms) after; p99 49 ms
  before, 12 ms after;
- ``/api/v1/autoscaling``: longest 17 ms before, 6.6 ms (slice 0.55 ms) after; p99 34 ms
  before, 9.4 ms after;
- five web dashboards: longest 33 ms (GC 21 ms) before, 2.9 ms (slice 1.35 ms) after; p99
  55 ms before, 11 ms after.

A slice's p99 is 0.5-0.9 ms (the odd longer one met a garbage collection). The work per
reading at 1,000 agents is about 6 ms to take it, 6 ms to encode the agents JSON and 2 ms for
the per-agent Prometheus lines (prometheus_client took 40 ms for those; see
``prometheus_fleet``); a scrape or a poll that reuses a reading costs well under a millisecond.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from paddler.balancer.fleet.agent_controller import AgentSnapshot
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool

T = TypeVar("T")
K = TypeVar("K")

SLICE_SECONDS = 0.0005
"""Loop time one slice may take before it lets requests run."""
BUDGET = 0.02
"""Share of the loop's time that readers may take, at most, by reusing readings."""
FRESH_BELOW = 0.001
"""A reading that cost less loop time than this is taken afresh for every reader."""
_FIRST_SLICE = 16
"""Items in a first slice, before their cost is known."""


class AgentReading(NamedTuple):
    """One agent in a reading. A named tuple: 1,000 of them are made per reading."""

    snapshot: AgentSnapshot
    usable: bool
    prefill_rate: float | None
    slot_hold: float | None


@dataclass(frozen=True)
class FleetTotals:
    """The fleet's slots and agents, counted over usable agents only, as ``/health`` does."""

    slots_idle: int
    slots_processing: int
    usable_agents: int
    taken_at: float
    """The view's clock (monotonic) when they were counted."""

    @property
    def slots_total(self) -> int:
        return self.slots_idle + self.slots_processing


@dataclass(frozen=True, eq=False)
class FleetReading:
    """The fleet at one moment, for readers. Compared by identity: what is made of a reading
    is kept per reading."""

    agents: tuple[AgentReading, ...]
    totals: FleetTotals
    """The sums over ``agents``."""
    wall_time: float
    """Unix time when the reading was taken."""

    @property
    def slots_idle(self) -> int:
        return self.totals.slots_idle

    @property
    def slots_processing(self) -> int:
        return self.totals.slots_processing

    @property
    def slots_total(self) -> int:
        return self.totals.slots_total

    @property
    def usable_agents(self) -> int:
        return self.totals.usable_agents

    @property
    def taken_at(self) -> float:
        return self.totals.taken_at


class FleetView:
    """Hands out ``FleetReading``s of one pool (see the module docstring)."""

    def __init__(
        self,
        pool: AgentControllerPool,
        *,
        budget: float = BUDGET,
        fresh_below: float = FRESH_BELOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._budget = budget
        self._fresh_below = fresh_below
        self._clock = clock
        self._reading: FleetReading | None = None
        self._spent = 0.0
        """Loop time the current reading cost so far: taking it, and encoding it."""
        self._reuse_until = float("-inf")
        self._taking_spent = 0.0
        self._taking: Shared[None, FleetReading] = Shared()

    async def latest(self) -> FleetReading:
        """The current reading, or a new one if it is due (see the module docstring)."""
        reading = self._reading
        if reading is not None and self._clock() < self._reuse_until:
            return reading
        return await self._taking.run(None, self._take)

    async def totals(self) -> FleetTotals:
        """The fleet's totals, for readers that need no agent (the stats and StatsD ticks, the
        autoscaling advice): the pool's, live and O(1)."""
        fleet = self._pool.totals()
        return FleetTotals(
            fleet.slots_idle, fleet.slots_processing, fleet.usable_agents, self._clock()
        )

    def slices(
        self, items: Sequence[T], reading: FleetReading | None = None
    ) -> AsyncIterator[Sequence[T]]:
        """``items`` in slices (see ``sliced``), the work on each charged to ``reading``'s
        budget if it is the current reading."""
        return sliced(
            items, None if reading is None else lambda seconds: self._charge(reading, seconds)
        )

    def _charge(self, reading: FleetReading, seconds: float) -> None:
        if reading is self._reading:
            self._spent += seconds
            self._reuse_from(reading)

    def _charge_taking(self, seconds: float) -> None:
        self._taking_spent += seconds

    def _reuse_from(self, reading: FleetReading) -> None:
        if self._spent < self._fresh_below:
            self._reuse_until = float("-inf")
        else:
            self._reuse_until = reading.taken_at + self._spent / self._budget

    async def _take(self) -> FleetReading:
        self._taking_spent = 0.0
        agents: list[AgentReading] = []
        idle = processing = usable = 0
        clock = self._pool.clock
        async for chunk in sliced(self._pool.agents(), self._charge_taking):
            now = clock()
            for agent in chunk:
                if agent.removed:
                    continue
                snapshot = agent.snapshot(now)
                is_usable = agent.usable()
                if is_usable:
                    idle += snapshot.slots_idle
                    processing += snapshot.slots_processing
                    usable += 1
                agents.append(
                    AgentReading(snapshot, is_usable, agent.prefill_rate, agent.slot_hold)
                )
        reading = FleetReading(
            agents=tuple(agents),
            totals=FleetTotals(idle, processing, usable, self._clock()),
            wall_time=time.time(),
        )
        self._reading = reading
        self._spent = self._taking_spent
        self._reuse_from(reading)
        return reading


async def sliced(
    items: Sequence[T], charge: Callable[[float], None] | None = None
) -> AsyncIterator[Sequence[T]]:
    """``items`` in slices of about ``SLICE_SECONDS`` of work each, letting the loop run between
    them; ``charge`` is told the seconds of each slice's work (the body of the ``async for``,
    which must not await)."""
    size = _FIRST_SLICE
    per_item: float | None = None
    start = 0
    while start < len(items):
        chunk = items[start : start + size]
        started = time.perf_counter()
        yield chunk
        elapsed = time.perf_counter() - started
        if charge is not None:
            charge(elapsed)
        start += len(chunk)
        if start < len(items):
            # Smoothed, and growing at most twofold: one fast slice (warm caches) must not make
            # the next one long.
            measured = elapsed / len(chunk)
            per_item = measured if per_item is None else (per_item + measured) / 2
            size = max(1, min(int(SLICE_SECONDS / max(per_item, 1e-9)), 2 * len(chunk)))
            await asyncio.sleep(0)


class Shared(Generic[K, T]):
    """An async computation shared by every caller that asks for the same key while it runs.

    The first caller computes, in its own task; the others await its result. If that caller is
    cancelled midway, one of the others takes over (nobody else is left waiting on a task that
    no one owns).
    """

    def __init__(self) -> None:
        self._running: tuple[K, asyncio.Future[T]] | None = None

    async def run(self, key: K, compute: Callable[[], Awaitable[T]]) -> T:
        while True:
            running = self._running
            if running is None or running[0] != key:
                return await self._compute(key, compute)
            try:
                return await asyncio.shield(running[1])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The caller that computed was cancelled, not us: compute it ourselves.

    async def _compute(self, key: K, compute: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running = (key, future)
        try:
            result = await compute()
        except BaseException:
            # Those waiting try again themselves (and meet the same error, if it is one).
            future.cancel()
            raise
        finally:
            if self._running is not None and self._running[1] is future:
                self._running = None
        future.set_result(result)
        return result


class PerReading(Generic[T]):
    """Something made from the view's reading, once per reading, however many ask at once."""

    def __init__(self, view: FleetView, make: Callable[[FleetReading], Awaitable[T]]) -> None:
        self._view = view
        self._make = make
        self._made: tuple[FleetReading, T] | None = None
        self._making: Shared[FleetReading, tuple[FleetReading, T]] = Shared()

    async def get(self) -> tuple[FleetReading, T]:
        """The latest reading, and what was made of it."""
        reading = await self._view.latest()
        made = self._made
        if made is not None and made[0] is reading:
            return made
        return await self._making.run(reading, lambda: self._make_for(reading))

    async def _make_for(self, reading: FleetReading) -> tuple[FleetReading, T]:
        made = (reading, await self._make(reading))
        self._made = made
        return made
