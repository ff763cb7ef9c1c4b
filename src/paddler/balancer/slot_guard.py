"""A reservation on one agent, released exactly once however the request ends.

Use it as a context manager around everything that talks to the upstream::

    with guard:
        ...  # proxy the request

Leaving the block releases the reservation and wakes buffered requests: on success, on error and
on cancellation alike. A cancellation means the client went away mid-request; llama.cpp frees the
slot only once it notices the closed connection, so the slot is released as *settling* (see
``agent_controller``).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paddler.balancer.agent_controller import AgentController
    from paddler.balancer.agent_controller_pool import AgentControllerPool


class SlotGuard:
    __slots__ = ("_pool", "_released", "agent", "holds_slot", "reserved_at")

    def __init__(
        self,
        pool: AgentControllerPool,
        agent: AgentController,
        holds_slot: bool,
        reserved_at: float,
    ) -> None:
        self._pool = pool
        self.agent = agent
        self.holds_slot = holds_slot
        self.reserved_at = reserved_at
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, abandoned: bool = False) -> None:
        """Give the reservation back; calling it again does nothing."""
        if self._released:
            return
        self._released = True
        self._pool.release(self, abandoned=abandoned)

    def __enter__(self) -> SlotGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release(
            abandoned=exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        )
