"""A reservation on one agent, released exactly once however the request ends.

Use it as a context manager around everything that talks to the upstream::

    with guard:
        ...  # proxy the request

Leaving the block releases the reservation and wakes buffered requests: on success, on error and
on cancellation alike. A cancellation means the client went away mid-request; llama.cpp frees the
slot only once it notices the closed connection, so the slot is released as *settling* (see
``agent_controller``).

A guard can also be *aborted*: its server is known to be gone (its agent reported llama.cpp
unreachable), so whatever the request waits for will never come. The proxy attaches the action
that ends that wait (``on_abort``); aborting runs it, once, and releases nothing: the block that
holds the guard still ends the request and releases it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from paddler.balancer.fleet.agent_controller import AgentController


class Received(Protocol):
    """What a response's body stream tells of its progress (aiohttp's ``StreamReader``)."""

    @property
    def total_bytes(self) -> int: ...


class SlotGuard:
    __slots__ = (
        "_abort_action",
        "_on_release",
        "_released",
        "aborted",
        "agent",
        "holds_slot",
        "received",
        "reserved_at",
    )

    def __init__(
        self,
        agent: AgentController,
        holds_slot: bool,
        reserved_at: float,
        on_release: Callable[[SlotGuard, bool], None],
    ) -> None:
        self.agent = agent
        self.holds_slot = holds_slot
        self.reserved_at = reserved_at
        self._on_release = on_release
        self._released = False
        self._abort_action: Callable[[str], None] | None = None
        self.aborted: str | None = None
        """Why the guard was aborted, once it was."""
        self.received: Received | None = None
        """The response's body stream (set by the proxy once the response headers arrived),
        whose byte count is read only to find requests stuck on a silent server (see
        ``silent_servers``)."""

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, abandoned: bool = False) -> None:
        """Give the reservation back; calling it again does nothing."""
        if self._released:
            return
        self._released = True
        self._abort_action = None
        self._on_release(self, abandoned)

    def on_abort(self, action: Callable[[str], None] | None) -> None:
        """Make ``action(reason)`` what an abort does from now on (None: nothing). If the guard
        was aborted already, ``action`` runs at once."""
        self._abort_action = action
        if action is not None and self.aborted is not None and not self._released:
            action(self.aborted)

    def abort(self, reason: str) -> None:
        """The server is gone: end the request's wait on it. Only the first call counts."""
        if self._released or self.aborted is not None:
            return
        self.aborted = reason
        if self._abort_action is not None:
            self._abort_action(reason)

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
