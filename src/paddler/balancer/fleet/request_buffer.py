"""Requests that wait for a slot, in arrival order, bounded in number and in time.

``acquire`` returns a ``SlotGuard`` at once when an agent can take the request and nobody
waits; otherwise the request joins the queue of the model it names. Whenever the pool reports
that capacity may have grown (on one agent, or anywhere), waiters are handed reservations
directly: they are woken by the event, never by polling, and a newcomer never overtakes a
waiter that the same slot could serve.

Cost (issue 10): every step is O(1) or O(log n) in the number of waiters, which may be tens of
thousands while a fleet scales from zero. Queues are ``OrderedDict``s, so a waiter that times
out or whose client leaves is removed without a walk. A newcomer while nothing is free for its
model only joins its queue. A freed slot serves queue heads while some slot is left for them
(asked of the pool in O(1)): the walk stops at the first waiter no free slot can serve.

Two kinds of waiters are passed over rather than stopping the walk, each at the cost of one
pick: a waiter that excludes the servers that are free (after failing on them), and, with the
prefix policy, a waiter that chose to wait for the full server holding its prefix.

Order: per model, waiters leave in arrival order, with the prefix policy's two documented
exceptions (docs/routing.md): a slot that frees on a server goes first to the oldest waiter
that holds its prompt's prefix *there* (``_prefers``, filled when a waiter joins), and a waiter
may choose to keep waiting for its server while others are served elsewhere. Across models,
queue heads are served in arrival order.

A waiter that cannot be served (for example one that excludes the only free agent after a failure
there, or one for another model) does not block those behind it.

Buffering is per model: ``size`` bounds the waiters for each model a request can name (and for
requests that name none), so that a flood of requests for one model never fills the buffer for
another. Unknown models are refused before they get here, but a fleet that has not reported any
model yet accepts every name, so the whole buffer is also bounded: ``size`` times the number of
models the fleet serves (at least one). Should the fleet's models change so that a waiting
request's model is no longer served, it is refused (``UnknownModel``): that check walks the
queue, once per change of the fleet's models.

The routing policy may keep a request waiting although a slot is free elsewhere (when waiting
for the server that holds its prefix is cheaper); it then names a time to decide again, and the
buffer dispatches again at that time.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.model_names import model_id
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.policies import Demand, RoutingPolicy

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


@dataclass(eq=False, slots=True)
class _Waiter:
    demand: Demand
    seq: int
    future: asyncio.Future[SlotGuard] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    model: str | None = field(init=False)
    """The buffer's key: the id of the model the request names, whatever name it used."""
    prefers: AgentController | None = None
    """The server that held the most of its prompt when it joined (prefix routing)."""

    def __post_init__(self) -> None:
        self.model = None if self.demand.model is None else model_id(self.demand.model)


_Queue = OrderedDict[int, _Waiter]

_EXPIRY_CONTEXT = contextvars.Context()
"""What a waiter's expiry runs in: it reads no context variable, and uvloop would copy the
waiting task's context for each timer otherwise."""


class RequestBuffer:
    def __init__(
        self,
        pool: AgentControllerPool,
        *,
        size: int,
        timeout: float,
        policy: RoutingPolicy | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy or pool.policy
        self._size = size
        self._timeout = timeout
        self._queues: dict[tuple[str | None, bool], _Queue] = {}
        """Per model and per need of a slot: a queue's waiters all ask the same of the pool, so
        that a queue's walk may stop at the first one it cannot serve."""
        self._per_model: Counter[str | None] = Counter()
        self._prefers: dict[AgentController, _Queue] = {}
        self._waiting = 0
        self._seq = itertools.count()
        self._models_version = pool.models_version
        self._revisit: asyncio.TimerHandle | None = None
        self._revisit_at = 0.0
        self._closed = False
        pool.on_capacity(self._dispatch)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def timeout(self) -> float:
        return self._timeout

    def waiting_for(self, model: str | None) -> int:
        return self._per_model[None if model is None else model_id(model)]

    async def acquire(self, demand: Demand, *, deadline: float | None = None) -> SlotGuard:
        """Wait for a reservation; ``deadline`` is on the loop clock (default: now + timeout).

        Raises ``BufferFull``, ``BufferTimeout``, ``NoCandidates`` or ``ShuttingDown``.
        """
        guard = self.acquire_now(demand)
        if guard is not None:
            return guard
        return await self.wait(demand, deadline=deadline)

    def acquire_now(self, demand: Demand) -> SlotGuard | None:
        """A reservation at once, if one can be had without waiting; None if the request must
        ``wait``. Raises ``NoCandidates`` or ``ShuttingDown``."""
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        if demand.exclude and not self._pool.has_candidates(demand.exclude, demand.model):
            raise NoCandidates("no other agent is registered")
        if not self._waiting:
            # Nobody waits, so nobody can be overtaken: a free slot is taken at once.
            agent = self._pool.pick(demand)
            if agent is not None:
                return self._pool.reserve(agent, demand)
        return None

    async def wait(self, demand: Demand, *, deadline: float | None = None) -> SlotGuard:
        """Join the queue, after ``acquire_now`` gave nothing; see ``acquire``."""
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        waiter = _Waiter(demand, next(self._seq))
        if self._per_model[waiter.model] >= self._size or self._waiting >= self._size * max(
            1, self._pool.models_served
        ):
            self._policy.abandoned(demand)
            whose = f" for model {demand.model!r}" if demand.model else ""
            raise BufferFull(f"the request buffer is full ({self._size} requests waiting{whose})")
        self._add(waiter)
        if self._pool.has_free(demand.model, demand.needs_slot):
            # Something is free, yet this request (or one before it) was not given it: see
            # whether the queue can move now (waiters before it may exclude what is free).
            self._serve_heads()
        elif demand.revisit_at is not None:
            self._schedule_revisit(demand.revisit_at)
        if waiter.future.done():
            return waiter.future.result()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._timeout
        # A timer that fails the waiter's future, not asyncio.timeout around the wait: that
        # is three objects more per waiting request (its Timeout and two bound methods).
        expiry = loop.call_at(deadline, self._expire, waiter, context=_EXPIRY_CONTEXT)
        try:
            return await waiter.future
        except BufferTimeout:
            raise  # _expire has taken it out of the queues
        except BaseException:
            self._forget(waiter)
            raise
        finally:
            expiry.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        """``waiter``'s deadline has come with no slot handed to it."""
        if waiter.future.done():
            return
        self._remove(waiter)
        self._policy.abandoned(waiter.demand)
        waiter.future.set_exception(
            BufferTimeout(f"no llama.cpp slot became free within {self._timeout:g}s")
        )

    def close(self) -> None:
        """Refuse new requests and fail every waiting one with ``ShuttingDown``."""
        self._closed = True
        if self._revisit is not None:
            self._revisit.cancel()
        for queue in list(self._queues.values()):
            for waiter in list(queue.values()):
                self._remove(waiter)
                self._policy.abandoned(waiter.demand)
                if not waiter.future.done():
                    waiter.future.set_exception(ShuttingDown("the balancer is shutting down"))

    def _add(self, waiter: _Waiter) -> None:
        key = (waiter.model, waiter.demand.needs_slot)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = OrderedDict()
        queue[waiter.seq] = waiter
        self._waiting += 1
        self._per_model[waiter.model] += 1
        cache_key = self._policy.preferred(waiter.demand)
        prefers = None if cache_key is None else self._pool.agent_with_cache_key(cache_key)
        if prefers is not None:
            waiter.prefers = prefers
            self._prefers.setdefault(prefers, OrderedDict())[waiter.seq] = waiter

    def _remove(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of its queues; return False if it was not in them."""
        key = (waiter.model, waiter.demand.needs_slot)
        queue = self._queues.get(key)
        if queue is None or queue.pop(waiter.seq, None) is None:
            return False
        if not queue:
            del self._queues[key]
        self._waiting -= 1
        self._per_model[waiter.model] -= 1
        if not self._per_model[waiter.model]:
            del self._per_model[waiter.model]
        if waiter.prefers is not None:
            preferring = self._prefers.get(waiter.prefers)
            if preferring is not None:
                preferring.pop(waiter.seq, None)
                if not preferring:
                    del self._prefers[waiter.prefers]
        return True

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; a slot handed to it at the last moment goes back."""
        self._remove(waiter)
        self._policy.abandoned(waiter.demand)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            future.result().release()

    def _dispatch(self, freed: AgentController | None) -> None:
        """Hand free slots to waiters: first to those that hold their prefix on the server that
        freed one (on any server, for a change of the whole fleet), then to queue heads.

        So a slot that frees on a server goes first to a request that wants that very server,
        and another request spills onto it only if none does: under load, spilling would only
        trade one request's cache hit for another's miss.
        """
        if not self._waiting:
            return
        if self._models_version != self._pool.models_version:
            self._models_version = self._pool.models_version
            self._refuse_unknown_models()
        if self._prefers:
            for server in list(self._prefers) if freed is None else [freed]:
                self._serve_preferring(server)
        self._serve_heads()

    def _serve_preferring(self, server: AgentController) -> None:
        preferring = self._prefers.get(server)
        if not preferring:
            return
        served: list[tuple[_Waiter, AgentController]] = []
        for waiter in preferring.values():
            if server.free_slots() < 1:
                break
            if waiter.future.done():
                continue
            agent = self._pool.pick(waiter.demand, spill=False)
            if agent is not None:
                served.append((waiter, agent))
                self._hand(waiter, agent)
        for waiter, _ in served:
            self._remove(waiter)

    def _serve_heads(self) -> None:
        """Serve each model's waiters in arrival order (heads of all queues merged by arrival)
        while the pool has a free slot for them; pass over those no free slot suits.

        The queues are iterated in place (no copy: that would be a walk), so waiters handed a
        slot are taken out of them after the walk.
        """
        heap: list[tuple[int, tuple[str | None, bool], Iterator[_Waiter]]] = []
        for key, queue in self._queues.items():
            waiters = iter(queue.values())
            first = next(waiters, None)
            if first is not None:
                heap.append((first.seq, key, itertools.chain((first,), waiters)))
        heapq.heapify(heap)
        revisit_at: float | None = None
        served: list[_Waiter] = []
        while heap:
            _, key, waiters = heapq.heappop(heap)
            waiter = next(waiters, None)
            if waiter is None:
                continue
            demand = waiter.demand
            if not waiter.future.done():
                if not self._pool.has_free(demand.model, demand.needs_slot):
                    continue  # nothing left for this model: its queue waits
                agent = self._pool.pick(demand)
                if agent is not None:
                    self._hand(waiter, agent)
                    served.append(waiter)
                elif demand.revisit_at is not None:
                    revisit_at = min(revisit_at or demand.revisit_at, demand.revisit_at)
            following = next(waiters, None)
            if following is not None:
                heapq.heappush(heap, (following.seq, key, itertools.chain((following,), waiters)))
        for waiter in served:
            self._remove(waiter)
        self._schedule_revisit(revisit_at)

    def _hand(self, waiter: _Waiter, agent: AgentController) -> None:
        """Reserve ``agent`` for ``waiter``; the caller takes it out of the queues."""
        waiter.future.set_result(self._pool.reserve(agent, waiter.demand))

    def _refuse_unknown_models(self) -> None:
        """The fleet's models changed: refuse waiters whose model it no longer serves."""
        for queue in list(self._queues.values()):
            for waiter in list(queue.values()):
                model = waiter.demand.model
                if model is not None and not self._pool.accepts(model):
                    self._remove(waiter)
                    self._policy.abandoned(waiter.demand)
                    waiter.future.set_exception(UnknownModel(model, self._pool.model_ids()))

    def _schedule_revisit(self, when: float | None) -> None:
        """Dispatch again at ``when`` (the pool's clock), the earliest time a waiter asked for."""
        if self._revisit is not None:
            if when is not None and self._revisit_at <= when:
                return
            if when is None:
                return
            self._revisit.cancel()
            self._revisit = None
        if when is not None:
            delay = max(0.0, when - self._pool.clock())
            self._revisit_at = when
            self._revisit = asyncio.get_running_loop().call_later(delay, self._revisited)

    def _revisited(self) -> None:
        self._revisit = None
        self._dispatch(None)
