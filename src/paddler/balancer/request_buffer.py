"""Requests that wait for a slot, in arrival order, bounded in number and in time.

``acquire`` returns a ``SlotGuard`` at once when an agent can take the request and nobody who
could use that agent is waiting; otherwise the request joins the queue. Whenever the pool reports
that capacity may have changed, the queue is walked in FIFO order and each waiter that some agent
can serve is handed a reservation directly: waiters are woken by the event, never by polling, and
a newcomer never overtakes a waiter that the same slot could serve.

A waiter that cannot be served (for example one that excludes the only free agent after a failure
there) does not block those behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from paddler.balancer.agent_controller_pool import AgentControllerPool
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


@dataclass(eq=False)
class _Waiter:
    needs_slot: bool
    exclude: frozenset[str]
    future: asyncio.Future[SlotGuard] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RequestBuffer:
    def __init__(self, pool: AgentControllerPool, *, size: int, timeout: float) -> None:
        self._pool = pool
        self._size = size
        self._timeout = timeout
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        pool.on_capacity(self._dispatch)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def timeout(self) -> float:
        return self._timeout

    async def acquire(
        self,
        *,
        needs_slot: bool,
        exclude: frozenset[str] = frozenset(),
        deadline: float | None = None,
    ) -> SlotGuard:
        """Wait for a reservation; ``deadline`` is on the loop clock (default: now + timeout).

        Raises ``BufferFull``, ``BufferTimeout``, ``NoCandidates`` or ``ShuttingDown``.
        """
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        if exclude and not self._pool.has_candidates(exclude):
            raise NoCandidates("no other agent is registered")
        waiter = _Waiter(needs_slot, exclude)
        self._waiters.append(waiter)
        self._dispatch()
        if waiter.future.done():
            return waiter.future.result()
        if len(self._waiters) > self._size:
            self._waiters.remove(waiter)
            raise BufferFull(f"the request buffer is full ({self._size} requests waiting)")
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
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(ShuttingDown("the balancer is shutting down"))

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; a slot handed to it at the last moment goes back."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            future.result().release()

    def _dispatch(self) -> None:
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            agent = self._pool.pick(waiter.needs_slot, waiter.exclude)
            if agent is None:
                continue
            self._waiters.remove(waiter)
            waiter.future.set_result(self._pool.reserve(agent, waiter.needs_slot))
