"""What happens to each proxied request, told to whoever watches: metrics, logs, traces.

The proxy calls an ``Observer`` at each step of a request's life; observers never change what
the proxy does, except that ``upstream_headers`` may add headers to the upstream request (trace
context). Each observability concern (Prometheus, request logs, OpenTelemetry, ...) is one
observer in a module of its own, and ``Observers`` fans each call out to all of them.

Observers run on the proxy's hot path: they must not block and must not raise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.proxy.verdict import Fault
from paddler.balancer.routing.cache_report import CacheReport

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a request ended, from the balancer's point of view."""

    COMPLETED = "completed"  # an answer was relayed in full (whatever its status)
    CLIENT_GONE = "client_gone"
    UPSTREAM_FAILED = "upstream_failed"  # no server could answer, or one broke mid-answer
    BUFFER_FULL = "buffer_full"
    BUFFER_TIMEOUT = "buffer_timeout"
    REFUSED = "refused"  # bad input: body too large, out of body memory
    SHUTTING_DOWN = "shutting_down"
    UNAUTHORIZED = "unauthorized"  # no valid client key: answered 401 before anything else


_FINE_OUTCOMES = frozenset({Outcome.COMPLETED, Outcome.CLIENT_GONE})


@dataclass(eq=False, slots=True, weakref_slot=True)  # tracing keeps spans by record
class RequestRecord:
    """One client request, filled in as it goes."""

    id: str
    method: str
    path: str
    route: str
    needs_slot: bool
    model: str | None = None
    key_id: str | None = None
    """The id of the client's API key (``api_keys``; never the key), None without client keys."""
    client_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    started: float = field(default_factory=time.perf_counter)
    buffer_wait: float = 0.0
    agent: AgentController | None = None
    attempts: int = 0
    first_chunk_at: float | None = None
    status: int | None = None
    cache: CacheReport | None = None
    """What llama.cpp reported of its prompt cache for this request, if it did."""
    outcome: Outcome | None = None
    fault: Fault | None = None
    """Whose fault the relayed answer was (see ``verdict``)."""
    ended: float | None = None

    @property
    def failed(self) -> bool:
        """Whether the fleet failed this request: any outcome but a relayed answer or a client
        that hung up, or a relayed 5xx that was not the request's own (a 4xx, a 501, or a 5xx
        that several servers gave it are the request's)."""
        if self.outcome not in _FINE_OUTCOMES:
            return True
        if self.fault is Fault.REQUEST:
            return False
        return self.status is not None and self.status >= 500

    @property
    def time_to_first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class Observer:
    """Every hook, doing nothing; observers override what they need."""

    def request_started(self, record: RequestRecord) -> None: ...

    def buffer_wait_started(self, record: RequestRecord) -> None: ...

    def buffer_wait_ended(self, record: RequestRecord) -> None: ...

    def upstream_started(self, record: RequestRecord, agent: AgentController) -> None: ...

    def upstream_headers(
        self, record: RequestRecord, headers: MutableMapping[str, str]
    ) -> None: ...

    def upstream_failed(
        self, record: RequestRecord, agent: AgentController, reason: str
    ) -> None: ...

    def retried(self, record: RequestRecord, agent: AgentController) -> None: ...

    def first_chunk(self, record: RequestRecord) -> None: ...

    def request_finished(self, record: RequestRecord) -> None: ...

    def unauthorized(self, path: str) -> None:
        """A request without a valid client key got 401 (it has no record: it never started)."""


_HOOKS = (
    "request_started",
    "buffer_wait_started",
    "buffer_wait_ended",
    "upstream_started",
    "upstream_headers",
    "upstream_failed",
    "retried",
    "first_chunk",
    "request_finished",
    "unauthorized",
)


class Observers(Observer):
    """Fans every hook out to each observer; one that raises is logged, not propagated.

    Each hook calls only the observers that override it: most hooks of most observers do
    nothing, and a request passes through every hook (without tracing, 3 of the 7 a request
    calls have a listener).
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        # One list per hook, an attribute each (``_request_started``, ...): each hook reads its
        # own, and calls its listeners in a ``try`` of its own, not through a helper function,
        # which would be one more call per listener and request.
        self._listeners: dict[str, list[Callable[..., None]]] = {hook: [] for hook in _HOOKS}
        listeners = self._listeners
        self._request_started = listeners["request_started"]
        self._buffer_wait_started = listeners["buffer_wait_started"]
        self._buffer_wait_ended = listeners["buffer_wait_ended"]
        self._upstream_started = listeners["upstream_started"]
        self._upstream_headers = listeners["upstream_headers"]
        self._upstream_failed = listeners["upstream_failed"]
        self._retried = listeners["retried"]
        self._first_chunk = listeners["first_chunk"]
        self._request_finished = listeners["request_finished"]
        self._unauthorized = listeners["unauthorized"]
        for observer in observers:
            self.add(observer)

    def add(self, observer: Observer) -> None:
        for hook, listeners in self._listeners.items():
            if getattr(type(observer), hook) is not getattr(Observer, hook):
                listeners.append(getattr(observer, hook))

    def request_started(self, record: RequestRecord) -> None:
        for hook in self._request_started:
            try:
                hook(record)
            except Exception:
                _failed(hook)

    def buffer_wait_started(self, record: RequestRecord) -> None:
        for hook in self._buffer_wait_started:
            try:
                hook(record)
            except Exception:
                _failed(hook)

    def buffer_wait_ended(self, record: RequestRecord) -> None:
        for hook in self._buffer_wait_ended:
            try:
                hook(record)
            except Exception:
                _failed(hook)

    def upstream_started(self, record: RequestRecord, agent: AgentController) -> None:
        for hook in self._upstream_started:
            try:
                hook(record, agent)
            except Exception:
                _failed(hook)

    def upstream_headers(self, record: RequestRecord, headers: MutableMapping[str, str]) -> None:
        for hook in self._upstream_headers:
            try:
                hook(record, headers)
            except Exception:
                _failed(hook)

    def upstream_failed(self, record: RequestRecord, agent: AgentController, reason: str) -> None:
        for hook in self._upstream_failed:
            try:
                hook(record, agent, reason)
            except Exception:
                _failed(hook)

    def retried(self, record: RequestRecord, agent: AgentController) -> None:
        for hook in self._retried:
            try:
                hook(record, agent)
            except Exception:
                _failed(hook)

    def first_chunk(self, record: RequestRecord) -> None:
        for hook in self._first_chunk:
            try:
                hook(record)
            except Exception:
                _failed(hook)

    def request_finished(self, record: RequestRecord) -> None:
        for hook in self._request_finished:
            try:
                hook(record)
            except Exception:
                _failed(hook)

    def unauthorized(self, path: str) -> None:
        for hook in self._unauthorized:
            try:
                hook(path)
            except Exception:
                _failed(hook)


def _failed(hook: object) -> None:
    # An observer bug must never fail a request; it is logged with its traceback.
    log.exception("observer %r failed", hook)
