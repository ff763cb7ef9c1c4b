"""The balancer's view of one llama.cpp server: what its agent reports and what we reserved.

Two sources describe how busy a server is, and neither is complete alone:

- the agent's report (``slots_processing``) is a sample of llama.cpp's ``/slots`` taken a moment
  ago: it misses what we dispatched since, and it includes traffic that bypasses the balancer;
- our own reservations (``reserved``) are exact for our traffic, but know nothing of anyone else.

So each report is split in two: what our reservations explain, and the rest, *foreign* slots
(``foreign = max(0, reported_processing - reserved)`` when the report arrives). Then
``busy = reserved + foreign + settling``: a slot we reserved counts once, however many reports
see it, and is freed only by the guard that reserved it (see ``slot_guard``), never by a report.
When our request ends its slot is free at once, without waiting for the next report: llama.cpp
frees a slot before it sends the end of the response.

``settling`` covers one gap: when a client disconnects we release its reservation at once, but
llama.cpp notices the closed connection and frees the slot a little later. Until the agent's next
report arrives (or ``settle_timeout`` passes), such a slot still counts as busy, so that the next
request does not land in llama.cpp's own wait queue.

An agent's word is not enough to count a server (see ``agent_verifier``): until the balancer has
reached the address itself, the agent is *unverified*, counts no slot and is not usable. Once
verified, its slots are bounded by ``slot_bound``, what the server says of itself (``/props``
``total_slots``) or ``--max-slots-per-agent`` when that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paddler.balancer.fleet.model_names import model_id, names_of
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status

if TYPE_CHECKING:
    from paddler.balancer.fleet.slot_guard import SlotGuard
    from paddler.balancer.routing.cache_report import CacheReport

_SMOOTHING = 0.2
"""Weight of the newest measurement in the running averages below."""

_MIN_PREFILL_TOKENS = 32
"""Prompts this short say more about per-request overhead than about prefill speed."""


@dataclass(frozen=True)
class AgentSnapshot:
    """An immutable view of one agent, for the API, health and dashboards."""

    id: str
    name: str
    url: str
    state: str
    error: str | None
    models: tuple[str, ...]
    slots_total: int
    slots_idle: int
    slots_processing: int
    slots_reported_processing: int
    requests_in_flight: int
    circuit_open: bool
    last_report_age: float
    registered_at: float
    verified: bool
    verification: str | None
    """Why the agent is not verified yet, or what bounds its slots once it is."""


@dataclass(eq=False)
class AgentController:
    id: str
    name: str
    address: Address
    status: Status
    last_report_at: float
    registered_at: float
    session_id: int = 0
    reserved: int = 0
    foreign: int = 0
    in_flight: int = 0
    settling: list[float] = field(default_factory=list)
    circuit_opened_at: float | None = None
    consecutive_failures: int = 0
    removed: bool = False
    cache_key: int = 0
    """Names this server's prompt cache in the prefix index; changes when the cache is lost."""
    prefill_rate: float | None = None
    """Measured prompt tokens computed per second (running average), once known."""
    slot_hold: float | None = None
    """Measured seconds a request holds a slot here (running average), once known."""
    awaited: int = 0
    """Requests waiting in the buffer for this agent in particular (prefix routing)."""
    models: dict[str, frozenset[str]] = field(default_factory=dict)
    """The models served here, by id, each with every name a client may use for it (see
    ``model_names``)."""
    model_names: frozenset[str] = frozenset()
    """Every name of every model served here."""
    lacking_routes: dict[str, float] = field(default_factory=dict)
    """Routes llama.cpp answered 501 for here, until when (pool clock) to believe it."""
    guards: set[SlotGuard] = field(default_factory=set)
    """The reservations of the requests running here now (``in_flight`` of them)."""
    verified: bool = False
    """Whether the balancer reached this address itself (see ``agent_verifier``)."""
    slot_bound: int = 0
    """The most slots counted here, once verified."""
    verification: str | None = "the balancer has not reached this address yet"
    """Why the agent is not verified yet, or what bounds its slots once it is."""

    def __post_init__(self) -> None:
        self._name_models(self.status.models)

    def _name_models(self, reported: tuple[str, ...]) -> None:
        models: dict[str, frozenset[str]] = {}
        for name in reported:
            model = model_id(name)
            models[model] = models.get(model, frozenset()) | names_of(name)
        self.models = models
        self.model_names = frozenset().union(*models.values())

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def slots_total(self) -> int:
        """The slots counted here: what the agent reports, within what was verified."""
        return min(self.status.slots_total, self.slot_bound) if self.verified else 0

    def busy_slots(self) -> int:
        return self.reserved + self.foreign + len(self.settling)

    def free_slots(self) -> int:
        return max(0, self.slots_total - self.busy_slots())

    @property
    def circuit_open(self) -> bool:
        return self.circuit_opened_at is not None

    def serves(self, model: str) -> bool:
        return model in self.model_names

    def lacks(self, route: str | None, now: float) -> bool:
        """Whether llama.cpp recently answered 501 for ``route`` here."""
        if route is None:
            return False
        until = self.lacking_routes.get(route)
        if until is None:
            return False
        if until <= now:
            del self.lacking_routes[route]
            return False
        return True

    def observe_prefill(self, report: CacheReport) -> None:
        if report.computed_tokens < _MIN_PREFILL_TOKENS or report.prompt_seconds <= 0:
            return
        self.prefill_rate = _average(
            self.prefill_rate, report.computed_tokens / report.prompt_seconds
        )

    def observe_hold(self, seconds: float) -> None:
        self.slot_hold = _average(self.slot_hold, seconds)

    def usable(self) -> bool:
        """Whether requests may be sent here at all (a slot is a separate question)."""
        return (
            self.verified
            and not self.removed
            and not self.circuit_open
            and self.status.state is LlamaCppState.OK
        )

    def expire_settling(self, now: float) -> bool:
        """Drop settling slots whose deadline passed; return whether any was dropped."""
        before = len(self.settling)
        self.settling = [deadline for deadline in self.settling if deadline > now]
        return len(self.settling) != before

    def accept_report(self, status: Status, now: float, cooldown: float) -> None:
        if status.models != self.status.models:
            self._name_models(status.models)
        self.status = status
        self.last_report_at = now
        self.foreign = max(0, status.slots_processing - self.reserved)
        # A report sent after a disconnect shows whether llama.cpp still holds the slot (it is
        # then counted as foreign); the settling estimate is no longer needed.
        self.settling.clear()
        if (
            self.circuit_opened_at is not None
            and status.state is LlamaCppState.OK
            and now - self.circuit_opened_at >= cooldown
        ):
            self.circuit_opened_at = None
            self.consecutive_failures = 0

    def snapshot(self, now: float) -> AgentSnapshot:
        busy = self.busy_slots() if self.status.state is LlamaCppState.OK else 0
        return AgentSnapshot(
            id=self.id,
            name=self.name,
            url=self.url,
            state=self.status.state.value,
            error=self.status.error,
            models=self.status.models,
            slots_total=self.slots_total,
            slots_idle=max(0, self.slots_total - busy),
            slots_processing=min(busy, self.slots_total),
            slots_reported_processing=self.status.slots_processing,
            requests_in_flight=self.in_flight,
            circuit_open=self.circuit_open,
            last_report_age=max(0.0, now - self.last_report_at),
            registered_at=self.registered_at,
            verified=self.verified,
            verification=self.verification,
        )


def _average(current: float | None, value: float) -> float:
    return value if current is None else current + _SMOOTHING * (value - current)
