"""Requests that wait for a slot, in arrival order, bounded in number and in time.

``acquire`` returns a ``SlotGuard`` at once when an agent can take the request and nobody who
could use that agent is waiting; otherwise the request joins the queue. Whenever the pool reports
that capacity may have changed, the queue is walked in FIFO order and each waiter that some agent
can serve is handed a reservation directly: waiters are woken by the event, never by polling, and
a newcomer never overtakes a waiter that the same slot could serve.

A waiter that cannot be served (for example one that excludes the only free agent after a failure
there, or one for another model) does not block those behind it.

Buffering is per model: ``size`` bounds the waiters for each model a request can name (and for
requests that name none), so that a flood of requests for one model never fills the buffer for
another. Unknown models are refused before they get here, but a fleet that has not reported any
model yet accepts every name, so the whole buffer is also bounded: ``size`` times the number of
models the fleet serves (at least one).

The routing policy may keep a request waiting although a slot is free elsewhere (when waiting
for the server that holds its prefix is cheaper); it then names a time to decide again, and the
buffer dispatches again at that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.model_names import model_id
from paddler.balancer.routing import Demand
from paddler.balancer.slot_guard import SlotGuard

log = logging.getLogger(__name__)


class BufferRejection(Exception):
    """A request that could not be given a slot."""


class BufferFull(BufferRejection):
    """The buffer already holds ``size`` waiting requests."""


class BufferTimeout(BufferRejection):
    """No slot freed up within the buffer timeout."""


class NoCandidates(BufferRejection):
    """Every agent that exists was already tried for this request."""


class ShuttingDown(BufferRejection):
    """The balancer is shutting down and takes no new work."""


class UnknownModel(BufferRejection):
    """The request names a model that the fleet, as it is now, does not serve."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(model)
        self.model = model
        self.served = served


@dataclass(eq=False)
class _Waiter:
    demand: Demand
    future: asyncio.Future[SlotGuard] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    model: str | None = field(init=False)
    """The buffer's key: the id of the model the request names, whatever name it used."""

    def __post_init__(self) -> None:
        self.model = None if self.demand.model is None else model_id(self.demand.model)


class RequestBuffer:
    def __init__(self, pool: AgentControllerPool, *, size: int, timeout: float) -> None:
        self._pool = pool
        self._size = size
        self._timeout = timeout
        self._waiters: deque[_Waiter] = deque()
        self._per_model: Counter[str | None] = Counter()
        self._revisit: asyncio.TimerHandle | None = None
        self._revisit_at = 0.0
        self._closed = False
        pool.on_capacity(self._dispatch)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def timeout(self) -> float:
        return self._timeout

    def waiting_for(self, model: str | None) -> int:
        return self._per_model[None if model is None else model_id(model)]

    async def acquire(self, demand: Demand, *, deadline: float | None = None) -> SlotGuard:
        """Wait for a reservation; ``deadline`` is on the loop clock (default: now + timeout).

        Raises ``BufferFull``, ``BufferTimeout``, ``NoCandidates`` or ``ShuttingDown``.
        """
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        if demand.exclude and not self._pool.has_candidates(demand.exclude, demand.model):
            raise NoCandidates("no other agent is registered")
        waiter = _Waiter(demand)
        self._add(waiter)
        self._dispatch()
        if waiter.future.done():
            return waiter.future.result()
        if self._per_model[waiter.model] > self._size or len(self._waiters) > self._size * max(
            1, len(self._pool.model_ids())
        ):
            self._forget(waiter)
            whose = f" for model {demand.model!r}" if demand.model else ""
            raise BufferFull(f"the request buffer is full ({self._size} requests waiting{whose})")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter.future
        except TimeoutError:
            self._forget(waiter)
            raise BufferTimeout(
                f"no llama.cpp slot became free within {self._timeout:g}s"
            ) from None
        except BaseException:
            self._forget(waiter)
            raise

    def close(self) -> None:
        """Refuse new requests and fail every waiting one with ``ShuttingDown``."""
        self._closed = True
        if self._revisit is not None:
            self._revisit.cancel()
        while self._waiters:
            waiter = self._waiters[0]
            self._remove(waiter)
            self._pool.policy.abandoned(waiter.demand)
            if not waiter.future.done():
                waiter.future.set_exception(ShuttingDown("the balancer is shutting down"))

    def _add(self, waiter: _Waiter) -> None:
        self._waiters.append(waiter)
        self._per_model[waiter.model] += 1

    def _remove(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        self._per_model[waiter.model] -= 1
        if not self._per_model[waiter.model]:
            del self._per_model[waiter.model]

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; a slot handed to it at the last moment goes back."""
        with contextlib.suppress(ValueError):
            self._remove(waiter)
        self._pool.policy.abandoned(waiter.demand)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            future.result().release()

    def _dispatch(self) -> None:
        """Hand free slots to waiters, in two passes over the queue, each in FIFO order.

        First each waiter may only take a slot on the server it prefers (the one that holds its
        prefix, or one as good); then, with what is left, the policy may send a waiter elsewhere.
        So a slot that frees on a server goes first to a request that wants that very server,
        and another request spills onto it only if none does: under load, spilling would only
        trade one request's cache hit for another's miss.
        """
        if not self._waiters:
            return
        revisit_at: float | None = None
        for spill in (False, True):
            for waiter in list(self._waiters):
                if waiter.future.done():
                    continue
                demand = waiter.demand
                agent = self._pool.pick(demand, spill=spill)
                if agent is None:
                    if demand.model is not None and not self._pool.accepts(demand.model):
                        # The fleet changed while it waited (a second model joined).
                        self._remove(waiter)
                        self._pool.policy.abandoned(demand)
                        waiter.future.set_exception(
                            UnknownModel(demand.model, self._pool.model_ids())
                        )
                        continue
                    if spill and demand.revisit_at is not None:
                        revisit_at = min(revisit_at or demand.revisit_at, demand.revisit_at)
                    continue
                self._remove(waiter)
                waiter.future.set_result(self._pool.reserve(agent, demand))
        self._schedule_revisit(revisit_at)

    def _schedule_revisit(self, when: float | None) -> None:
        """Dispatch again at ``when`` (the pool's clock), the earliest time a waiter asked for."""
        if self._revisit is not None:
            if when is not None and self._revisit_at <= when:
                return
            self._revisit.cancel()
            self._revisit = None
        if when is not None:
            delay = max(0.0, when - self._pool.clock())
            self._revisit_at = when
            self._revisit = asyncio.get_running_loop().call_later(delay, self._revisited)

    def _revisited(self) -> None:
        self._revisit = None
        self._dispatch()
