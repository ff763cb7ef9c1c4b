"""The fleet: which agents exist, which can take a request, and who gets the next slot.

Membership policy (documented in docs/membership.md):

- An agent is keyed by the address the balancer proxies to. A registration for an address that is
  already known takes it over (a reconnecting agent keeps its reservations); the older socket then
  no longer owns the agent and its closing removes nothing.
- An agent is removed when it deregisters, when its socket closes, or when no report arrived for
  ``stale_after`` seconds.
- Removal only stops new requests: requests already running on that server hold a reference to
  its controller and finish normally; their release is then a no-op for the fleet.

Everything here runs on the event loop between awaits, so no locks are needed. Changes that may
free capacity call the ``on_capacity`` listeners, which is how buffered requests are woken.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from paddler.balancer.agent_controller import AgentController, AgentSnapshot
from paddler.balancer.routing import Demand, RoutingPolicy, SlotsPolicy
from paddler.balancer.slot_guard import SlotGuard
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status

log = logging.getLogger(__name__)


class FleetFull(Exception):
    """The balancer already tracks ``max_agents`` agents."""


@dataclass(frozen=True)
class FleetSnapshot:
    agents: tuple[AgentSnapshot, ...]
    slots_idle: int
    slots_processing: int
    usable_agents: int

    @property
    def slots_total(self) -> int:
        return self.slots_idle + self.slots_processing


class AgentControllerPool:
    def __init__(
        self,
        *,
        settle_timeout: float = 2.0,
        circuit_cooldown: float = 5.0,
        failure_threshold: int = 3,
        max_agents: int = 1024,
        policy: RoutingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy: RoutingPolicy = policy or SlotsPolicy()
        self._agents: dict[str, AgentController] = {}
        self._cache_keys = itertools.count(1)
        self._settle_timeout = settle_timeout
        self._circuit_cooldown = circuit_cooldown
        self._failure_threshold = failure_threshold
        self._max_agents = max_agents
        self.clock = clock
        self._next_session = 0
        self._capacity_listeners: list[Callable[[], None]] = []
        self._circuit_listeners: list[Callable[[AgentController], None]] = []

    # -- membership -------------------------------------------------------------------------

    def register(self, name: str, address: Address, status: Status) -> tuple[AgentController, int]:
        """Add an agent, or take over the one at the same address; return it and the session."""
        now = self.clock()
        self._next_session += 1
        agent = self._agents.get(address.url)
        if agent is None:
            if len(self._agents) >= self._max_agents:
                raise FleetFull(f"the balancer already tracks {self._max_agents} agents")
            agent = AgentController(
                id=f"{name}@{address.authority}",
                name=name,
                address=address,
                status=status,
                last_report_at=now,
                registered_at=time.time(),
            )
            self._agents[address.url] = agent
            log.info("agent %s registered at %s: %s", name, address.url, _describe(status))
        else:
            log.info(
                "agent %s re-registered at %s, replacing its previous session", name, address.url
            )
            agent.name = name
            # The agent may have restarted, and its llama.cpp with it: assume the cache is gone.
            self.policy.forget(agent.cache_key)
        agent.cache_key = next(self._cache_keys)
        agent.session_id = self._next_session
        agent.accept_report(status, now, self._circuit_cooldown)
        self._capacity_changed()
        return agent, agent.session_id

    def report(self, agent: AgentController, session: int, status: Status) -> bool:
        """Record a status report; return False if that session no longer owns the agent."""
        if agent.removed or agent.session_id != session:
            return False
        previous = agent.status
        was = (agent.usable(), agent.free_slots())
        agent.accept_report(status, self.clock(), self._circuit_cooldown)
        if (previous.state, previous.error) != (status.state, status.error):
            log.info("agent %s is now %s", agent.name, _describe(status))
            if previous.state is LlamaCppState.OK:
                # llama.cpp may be restarting: whatever it had cached is not to be relied on.
                self.policy.forget(agent.cache_key)
                agent.cache_key = next(self._cache_keys)
        # Most reports change nothing a waiting request could use: only more free slots, a
        # change of usability or of models can let one through.
        was_usable, was_free = was
        if (
            agent.usable() != was_usable
            or agent.free_slots() > was_free
            or previous.models != status.models
        ):
            self._capacity_changed()
        return True

    def remove(self, agent: AgentController, session: int | None, reason: str) -> bool:
        """Remove an agent, unless a newer session took it over; return whether it was removed."""
        if agent.removed or (session is not None and agent.session_id != session):
            return False
        agent.removed = True
        del self._agents[agent.address.url]
        self.policy.forget(agent.cache_key)
        log.info(
            "agent %s removed (%s); %d request(s) still running there will finish",
            agent.name,
            reason,
            agent.in_flight,
        )
        return True

    def sweep(self, stale_after: float) -> None:
        """Remove agents that stopped reporting and expire settling slots."""
        now = self.clock()
        for agent in list(self._agents.values()):
            if now - agent.last_report_at > stale_after:
                self.remove(agent, None, f"no report for {now - agent.last_report_at:.1f}s")
        if any([agent.expire_settling(now) for agent in self._agents.values()]):
            self._capacity_changed()

    def agents(self) -> list[AgentController]:
        return list(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def snapshot(self) -> FleetSnapshot:
        now = self.clock()
        agents = tuple(agent.snapshot(now) for agent in self._agents.values())
        usable = [agent for agent in self._agents.values() if agent.usable()]
        return FleetSnapshot(
            agents=agents,
            slots_idle=sum(agent.free_slots() for agent in usable),
            slots_processing=sum(min(agent.busy_slots(), agent.slots_total) for agent in usable),
            usable_agents=len(usable),
        )

    # -- dispatch ---------------------------------------------------------------------------

    def on_capacity(self, listener: Callable[[], None]) -> None:
        self._capacity_listeners.append(listener)

    def on_circuit_open(self, listener: Callable[[AgentController], None]) -> None:
        """Call ``listener(agent)`` each time an agent's circuit opens (for metrics)."""
        self._circuit_listeners.append(listener)

    def pick(self, demand: Demand, *, spill: bool = True) -> AgentController | None:
        """The agent this request should go to now, or None if it should wait.

        Candidates are the usable agents that serve the demand's model (any agent, if it names
        none) and that it has not been tried on; the routing policy chooses among them. Without
        ``spill`` only the agent the request prefers (or one as good) may be chosen.
        """
        candidates = [
            agent
            for agent in self._agents.values()
            if agent.usable()
            and agent.id not in demand.exclude
            and (demand.model is None or agent.serves(demand.model))
        ]
        if not candidates:
            return None
        return self.policy.choose(candidates, demand, self.clock(), spill=spill)

    def serves(self, model: str) -> bool:
        """Whether ``model`` is known: some agent serves it, or no agent reported any model yet
        (an empty fleet may be scaling up from zero, and requests for it wait)."""
        reported = False
        for agent in self._agents.values():
            if agent.serves(model):
                return True
            reported = reported or bool(agent.status.models)
        return not reported

    def models(self) -> dict[str, list[AgentController]]:
        """Every model the fleet serves, with the agents that serve it."""
        served: dict[str, list[AgentController]] = {}
        for agent in self._agents.values():
            for model in agent.status.models:
                served.setdefault(model, []).append(agent)
        return served

    def has_candidates(self, exclude: Iterable[str], model: str | None = None) -> bool:
        """Whether any agent outside ``exclude`` (serving ``model``) exists, usable now or not."""
        excluded = set(exclude)
        return any(
            agent.id not in excluded and (model is None or agent.serves(model))
            for agent in self._agents.values()
        )

    def reserve(self, agent: AgentController, demand: Demand) -> SlotGuard:
        agent.in_flight += 1
        if demand.needs_slot:
            agent.reserved += 1
        self.policy.dispatched(agent, demand)
        return SlotGuard(self, agent, demand.needs_slot, self.clock())

    def release(self, guard: SlotGuard, *, abandoned: bool) -> None:
        """Called by ``SlotGuard.release`` only, exactly once per guard."""
        agent = guard.agent
        agent.in_flight -= 1
        if guard.holds_slot:
            agent.reserved -= 1
            now = self.clock()
            if abandoned:
                if not agent.removed:
                    agent.settling.append(now + self._settle_timeout)
            else:
                agent.observe_hold(now - guard.reserved_at)
        self._capacity_changed()

    # -- failures ---------------------------------------------------------------------------

    def trip(self, agent: AgentController, reason: str) -> None:
        """Take an agent out of rotation until it reports healthy again."""
        agent.consecutive_failures += 1
        opening = agent.circuit_opened_at is None
        agent.circuit_opened_at = self.clock()
        if opening:
            log.warning("circuit opened for agent %s: %s", agent.name, reason)
            for listener in self._circuit_listeners:
                listener(agent)

    def record_failure(self, agent: AgentController, reason: str) -> None:
        """A failure that may be the request's own fault; trips after repeated failures."""
        agent.consecutive_failures += 1
        if agent.consecutive_failures >= self._failure_threshold:
            self.trip(agent, f"{agent.consecutive_failures} failures in a row, last: {reason}")

    def record_success(self, agent: AgentController) -> None:
        agent.consecutive_failures = 0

    def _capacity_changed(self) -> None:
        for listener in self._capacity_listeners:
            listener()


def _describe(status: Status) -> str:
    text = f"{status.state.value}, {status.slots_idle} idle / {status.slots_total} slots"
    return f"{text} ({status.error})" if status.error else text
