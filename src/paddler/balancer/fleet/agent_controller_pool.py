"""The fleet: which agents exist, which can take a request, and who gets the next slot.

Membership policy (documented in docs/membership.md):

- An agent is keyed by the address the balancer proxies to. A registration for an address that is
  already known takes it over (a reconnecting agent keeps its reservations); the older socket then
  no longer owns the agent and its closing removes nothing.
- An agent is removed when it deregisters, when its socket closes, or when no report arrived for
  ``stale_after`` seconds.
- A registered agent counts for nothing until the balancer has reached its address itself
  (``verified``, called by ``agent_verifier``): until then it is listed, but it is not usable, its
  slots and models are not counted, and no request is sent there. A re-registration at a known address keeps
  what was verified.
- Removal only stops new requests: requests already running on that server hold a reference to
  its controller and finish normally; their release is then a no-op for the fleet. After a
  removal for silence, those that stop receiving bytes are ended (see ``silent_servers``).
- A report that llama.cpp became ``unreachable`` is the one signal that the server itself is gone
  (a silent or disconnected agent may leave it serving): the requests running there are ended at
  once, by aborting their guards (see ``slot_guard``). Those still waiting for response headers go
  to another server; streams end with the SSE error event.

Model policy (documented in docs/routing.md, "Models"): a request that names a model goes to
servers that answer to that name (see ``model_names``). A name no server answers to is served
anyway, by any server, when the fleet serves a single model (as a single llama.cpp would) or
with ``allow_unknown_models``; in a fleet of several models it is *unknown* (the proxy answers
404). A fleet where no agent reported a model yet (empty, or still loading) accepts every name,
so that requests can wait for it to scale up from zero.

A server that answered 501 for a route (llama.cpp without ``--embeddings``, say) is avoided for
that route for ``LACKING_ROUTE_SECONDS``, or until it restarts, while other servers may have it.

Cost (issue 10): nothing on the request path walks the fleet. The usable agents are kept in a
``CapacityIndex``, ordered by the routing policy's rank, per model name; ``pick`` reads the first
few of one list, plus, for the prefix policy, the servers the prefix index names for the
prompt. Every change of an agent that can move it in that order (a reservation, a release, a
report, a verification, its circuit) goes through ``_changed``, in O(log n). The fleet's totals
for ``/health`` are kept there too. What still walks the fleet runs off the request path: the
stale sweep (once a second) and ``snapshot`` (for the API and dashboards).

Everything here runs on the event loop between awaits, so no locks are needed. Changes that may
free capacity call the ``on_capacity`` listeners with the agent that changed (None when the
fleet's models or membership changed), which is how buffered requests are woken.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from paddler.balancer.fleet.agent_controller import AgentController, AgentSnapshot
from paddler.balancer.fleet.capacity_index import CapacityIndex
from paddler.balancer.fleet.silent_servers import SilentServers
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.policies import Demand, RoutingPolicy, SlotsPolicy
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status

log = logging.getLogger(__name__)

LACKING_ROUTE_SECONDS = 60.0
"""How long a 501 keeps a route away from a server: it costs one retry to find out again."""


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
        allow_unknown_models: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy: RoutingPolicy = policy or SlotsPolicy()
        self._agents: dict[str, AgentController] = {}
        self._lacking_until = 0.0
        """Until when some agent may lack some route: before, ``pick`` needs not ask each."""
        self._naming = Naming(frozenset(), frozenset(), allow_unknown_models)
        """The fleet's model names and ids, rebuilt on membership and model changes."""
        self._cache_keys = itertools.count(1)
        self._settle_timeout = settle_timeout
        self._circuit_cooldown = circuit_cooldown
        self._failure_threshold = failure_threshold
        self._max_agents = max_agents
        self.clock = clock
        self._next_session = 0
        self._silent = SilentServers()
        self._capacity_listeners: list[Callable[[AgentController | None], None]] = []
        self._change_listeners: list[Callable[[AgentController], None]] = []
        self._index = CapacityIndex(self.policy.tie_break)
        self._by_cache_key: dict[int, AgentController] = {}
        self._settling: set[AgentController] = set()
        self.models_version = 0
        """Changes whenever the fleet's model names change (a waiter's model may no longer be
        accepted)."""
        self._circuit_listeners: list[Callable[[AgentController], None]] = []

    # -- membership -------------------------------------------------------------------------

    def register(self, name: str, address: Address, status: Status) -> tuple[AgentController, int]:
        """Add an agent, or take over the one at the same address; return it and the session."""
        now = self.clock()
        self._next_session += 1
        self._silent.alive(address.url)
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
            log.info(
                "agent %s registered at %s: %s; counted once the balancer reaches it",
                name,
                address.url,
                _describe(status),
            )
        else:
            log.info(
                "agent %s re-registered at %s, replacing its previous session", name, address.url
            )
            agent.name = name
            # The agent may have restarted, and its llama.cpp with it: assume the cache is gone.
            self.policy.forget(agent.cache_key)
            agent.lacking_routes.clear()
        self._new_cache_key(agent)
        agent.session_id = self._next_session
        previous = agent.status
        agent.accept_report(status, now, self._circuit_cooldown)
        self._settling.discard(agent)
        self._abort_if_gone(agent, previous, status)
        models_changed = self._index_models()
        self._changed(agent)
        self._capacity_changed(None if models_changed else agent)
        return agent, agent.session_id

    def _new_cache_key(self, agent: AgentController) -> None:
        self._by_cache_key.pop(agent.cache_key, None)
        agent.cache_key = next(self._cache_keys)
        self._by_cache_key[agent.cache_key] = agent

    def _changed(self, agent: AgentController) -> None:
        """Move ``agent`` where its numbers put it now in the capacity index."""
        self._index.update(agent)
        for listener in self._change_listeners:
            listener(agent)

    def on_change(self, listener: Callable[[AgentController], None]) -> None:
        """Call ``listener(agent)`` whenever an agent registers, reports something new, is
        verified, tripped or removed (``agent.removed``): not at reservations (``--state
        redis``'s publisher of this balancer's agents)."""
        self._change_listeners.append(listener)

    def changed(self, agent: AgentController) -> None:
        """Say that ``agent``'s numbers were changed from outside the pool (tests do)."""
        self._changed(agent)

    def report(self, agent: AgentController, session: int, status: Status) -> bool:
        """Record a status report; return False if that session no longer owns the agent."""
        if agent.removed or agent.session_id != session:
            return False
        previous = agent.status
        if (
            status is previous
            and not agent.settling
            and agent.circuit_opened_at is None
            and agent.foreign == max(0, status.slots_processing - agent.reserved)
        ):
            # The very report the agent holds, again (the socket hands a repeated frame's
            # message over as it is, once a second from an idle server): only its time
            # changes, and the index has nothing to move. 1.3 µs instead of 9.
            agent.last_report_at = self.clock()
            return True
        was = (agent.usable(), agent.free_slots())
        agent.accept_report(status, self.clock(), self._circuit_cooldown)
        self._settling.discard(agent)
        self._abort_if_gone(agent, previous, status)
        if (previous.state, previous.error) != (status.state, status.error):
            log.info("agent %s is now %s", agent.name, _describe(status))
            if previous.state is LlamaCppState.OK:
                # llama.cpp may be restarting, maybe with other options: whatever it had cached,
                # and the routes it lacked, are not to be relied on.
                self.policy.forget(agent.cache_key)
                self._new_cache_key(agent)
                agent.lacking_routes.clear()
        models_changed = previous.models != status.models and self._index_models()
        self._changed(agent)
        # Most reports change nothing a waiting request could use: only more free slots, a
        # change of usability or of models can let one through.
        was_usable, was_free = was
        if models_changed:
            self._capacity_changed(None)
        elif (
            agent.usable() != was_usable
            or agent.free_slots() > was_free
            or previous.models != status.models
        ):
            self._capacity_changed(agent)
        return True

    def _abort_if_gone(self, agent: AgentController, previous: Status, status: Status) -> None:
        """llama.cpp just became unreachable: what runs there now will never get an answer.

        Only this report says so. An agent that stops reporting, or whose socket closes, may
        still leave its llama.cpp serving: its requests run on (see ``remove``).
        """
        if status.state is not LlamaCppState.UNREACHABLE or previous.state is status.state:
            return
        if not agent.guards:
            return
        reason = f"{agent.name} reported its llama.cpp unreachable"
        if status.error:
            reason += f" ({status.error})"
        log.warning(
            "agent %s: ending %d request(s) running there: %s",
            agent.name,
            len(agent.guards),
            reason,
        )
        for guard in list(agent.guards):
            guard.abort(reason)

    def owns(self, agent: AgentController, session: int) -> bool:
        """Whether ``session`` is still the agent's current session."""
        return not agent.removed and agent.session_id == session

    def verified(
        self,
        agent: AgentController,
        slot_bound: int,
        how: str | None = None,
        *,
        session: int | None = None,
    ) -> bool:
        """The balancer reached ``agent``'s address: count at most ``slot_bound`` slots there.

        ``how`` says where the bound comes from, for the API. Returns False (and changes nothing)
        if the agent was removed or ``session`` no longer owns it.
        """
        if agent.removed or (session is not None and agent.session_id != session):
            return False
        was_usable, was_free = agent.usable(), agent.free_slots()
        first = not agent.verified
        if first:
            log.info(
                "agent %s verified at %s: counting at most %d slot(s)%s",
                agent.name,
                agent.url,
                slot_bound,
                f" ({how})" if how else "",
            )
        agent.verified = True
        agent.slot_bound = slot_bound
        agent.verification = how
        models_changed = first and self._index_models()
        self._changed(agent)
        if models_changed:
            self._capacity_changed(None)
        elif first or agent.usable() != was_usable or agent.free_slots() > was_free:
            self._capacity_changed(agent)
        return True

    def unverified(
        self, agent: AgentController, reason: str, *, session: int | None = None
    ) -> bool:
        """An attempt to reach ``agent`` failed: keep it uncounted, and say why in the API.

        An agent verified before (at the same address, by an earlier session) stays verified.
        Returns False if the agent was removed or ``session`` no longer owns it.
        """
        if agent.removed or (session is not None and agent.session_id != session):
            return False
        if not agent.verified:
            agent.verification = reason
        return True

    def remove(self, agent: AgentController, session: int | None, reason: str) -> bool:
        """Remove an agent, unless a newer session took it over; return whether it was removed."""
        if agent.removed or (session is not None and agent.session_id != session):
            return False
        agent.removed = True
        del self._agents[agent.address.url]
        self._index.remove(agent)
        self._settling.discard(agent)
        self._by_cache_key.pop(agent.cache_key, None)
        self.policy.forget(agent.cache_key)
        self._index_models()
        for listener in self._change_listeners:
            listener(agent)
        # A removal can let a waiter through: a model only this server named is, in a fleet
        # left with one model, served by any server (see the module docstring).
        self._capacity_changed(None)
        log.info(
            "agent %s removed (%s); %d request(s) still running there will finish",
            agent.name,
            reason,
            agent.in_flight,
        )
        return True

    def sweep(self, stale_after: float) -> None:
        """Remove agents that stopped reporting, end what is stuck on them (see
        ``silent_servers``), and expire settling slots."""
        now = self.clock()
        for agent in list(self._agents.values()):
            if now - agent.last_report_at > stale_after:
                self.remove(agent, None, f"no report for {now - agent.last_report_at:.1f}s")
                self._silent.watch(agent)
        self._silent.check(now, stale_after)
        for agent in list(self._settling):
            if agent.expire_settling(now):
                self._changed(agent)
                self._capacity_changed(agent)
            if not agent.settling:
                self._settling.discard(agent)

    def agents(self) -> list[AgentController]:
        return list(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def snapshot(self) -> FleetSnapshot:
        now = self.clock()
        agents = tuple(agent.snapshot(now) for agent in self._agents.values())
        index = self._index
        return FleetSnapshot(
            agents=agents,
            slots_idle=index.slots_idle,
            slots_processing=index.slots_processing,
            usable_agents=index.usable_agents,
        )

    def totals(self) -> FleetSnapshot:
        """The fleet's totals without its agents (``agents`` is empty), in O(1): for
        ``/health``."""
        index = self._index
        return FleetSnapshot(
            agents=(),
            slots_idle=index.slots_idle,
            slots_processing=index.slots_processing,
            usable_agents=index.usable_agents,
        )

    # -- dispatch ---------------------------------------------------------------------------

    def on_capacity(self, listener: Callable[[AgentController | None], None]) -> None:
        """Call ``listener(agent)`` whenever capacity may have grown on ``agent`` (None: anywhere,
        or the fleet's models changed)."""
        self._capacity_listeners.append(listener)

    def on_circuit_open(self, listener: Callable[[AgentController], None]) -> None:
        """Call ``listener(agent)`` each time an agent's circuit opens (for metrics)."""
        self._circuit_listeners.append(listener)

    def pick(self, demand: Demand, *, spill: bool = True) -> AgentController | None:
        """The agent this request should go to now, or None if it should wait.

        Candidates are the usable agents that may serve the demand's model (see the module
        docstring) and that it has not been tried on; among them, those not known to lack its
        route, if any. The routing policy chooses among the candidates. Without ``spill`` only
        the agent the request prefers (or one as good) may be chosen.
        """
        if demand.model is not None and not self.accepts(demand.model):
            return None
        now = self.clock()
        candidates = self._candidates(demand, now)
        if not candidates:
            return None
        return self.policy.choose(candidates, demand, now, spill=spill)

    def _candidates(self, demand: Demand, now: float) -> list[AgentController]:
        """What the policy chooses among: the first ``breadth`` usable agents by rank that may
        serve the demand, and the usable ones among those the policy names by cache key (the
        prefix index's owners of its prompt).

        Agents known to lack the demand's route are left out, unless every candidate lacks it.
        Finding that out is the one walk of the fleet here, and happens only within a minute of
        a 501 (``_lacking_until``).
        """
        model_filter = self._model_filter(demand.model)
        breadth, keys = self.policy.shortlist(demand)
        route = demand.route if demand.route is not None and now < self._lacking_until else None
        exclude = demand.exclude
        candidates: list[AgentController] = []
        lacking: list[AgentController] = []
        for agent in self._index.ranked(model_filter):
            if agent.id in exclude:
                continue
            if route is not None and agent.lacks(route, now):
                if len(lacking) < breadth:
                    lacking.append(agent)
                continue
            candidates.append(agent)
            if len(candidates) >= breadth:
                break
        for key in keys:
            owner = self._by_cache_key.get(key)
            if (
                owner is None
                or owner in candidates
                or owner in lacking
                or not owner.usable()
                or owner.id in exclude
                or (model_filter is not None and not owner.serves(model_filter))
            ):
                continue
            if route is not None and owner.lacks(route, now):
                lacking.append(owner)
            else:
                candidates.append(owner)
        return candidates or lacking

    def has_free(self, model: str | None, needs_slot: bool = True) -> bool:
        """Whether some usable agent that may serve ``model`` has a free slot (any usable agent
        will do without ``needs_slot``), in O(1): the buffer asks before it walks."""
        model_filter = self._model_filter(model)
        if needs_slot:
            return self._index.has_free(model_filter)
        return self._index.has_usable(model_filter)

    def agent_with_cache_key(self, key: int) -> AgentController | None:
        return self._by_cache_key.get(key)

    def _model_filter(self, model: str | None) -> str | None:
        """The name candidates must answer to: ``model`` if some agent does, else none."""
        return model if model is not None and self.knows(model) else None

    def knows(self, model: str) -> bool:
        """Whether some agent answers to ``model``."""
        return model in self._naming.names

    def accepts(self, model: str) -> bool:
        """Whether a request naming ``model`` may be served (see the module docstring)."""
        return accepts(model, self._naming)

    def naming(self) -> Naming:
        """What ``accepts`` decides from (a worker keeps a copy: see ``remote_fleet``)."""
        return self._naming

    def at(self, url: str) -> AgentController | None:
        """The agent at ``url`` (``Address.url``), if any."""
        return self._agents.get(url)

    def model_ids(self) -> list[str]:
        """The ids of the models the fleet serves, sorted."""
        return sorted(self._naming.ids)

    @property
    def models_served(self) -> int:
        """How many models the fleet serves (``len(model_ids())`` without sorting them)."""
        return len(self._naming.ids)

    def models(self) -> dict[str, list[AgentController]]:
        """Every model the fleet serves, by id, with the (verified) agents that serve it."""
        served: dict[str, list[AgentController]] = {}
        for agent in self._verified_agents():
            for model in agent.models:
                served.setdefault(model, []).append(agent)
        return served

    def _verified_agents(self) -> list[AgentController]:
        return [agent for agent in self._agents.values() if agent.verified]

    def _index_models(self) -> bool:
        """Rebuild the fleet's model names; return whether they changed."""
        # Rebuilt whole, on membership and model changes only (not on every report). Only
        # verified agents: names claimed for an address nobody reached must not turn a
        # one-model fleet into one that refuses unknown names.
        agents = self._verified_agents()
        names = frozenset().union(*(agent.model_names for agent in agents))
        ids = frozenset().union(*(agent.models for agent in agents))
        if (names, ids) == (self._naming.names, self._naming.ids):
            return False
        self._naming = self._naming._replace(names=names, ids=ids)
        self.models_version += 1
        return True

    def has_candidates(
        self, exclude: Iterable[str], model: str | None = None, route: str | None = None
    ) -> bool:
        """Whether any agent outside ``exclude`` that may serve ``model`` (and is not known to
        lack ``route``) exists, usable now or not."""
        excluded = set(exclude)
        model_filter = self._model_filter(model)
        now = self.clock()
        return any(
            agent.id not in excluded
            and (model_filter is None or agent.serves(model_filter))
            and not agent.lacks(route, now)
            for agent in self._agents.values()
        )

    def lacks_route(self, agent: AgentController, route: str) -> None:
        """llama.cpp answered 501 for ``route`` on ``agent``: avoid it there for a while."""
        if not agent.lacks(route, self.clock()):
            log.info(
                "agent %s does not offer %s (llama.cpp answered 501); such requests go to other "
                "servers for the next %gs",
                agent.name,
                route,
                LACKING_ROUTE_SECONDS,
            )
        until = self.clock() + LACKING_ROUTE_SECONDS
        agent.lacking_routes[route] = until
        self._lacking_until = max(self._lacking_until, until)

    def offers_route(self, agent: AgentController, route: str) -> None:
        """``agent`` just served ``route``."""
        agent.lacking_routes.pop(route, None)

    def reserve(self, agent: AgentController, demand: Demand) -> SlotGuard:
        agent.in_flight += 1
        if demand.needs_slot:
            agent.reserved += 1
        self.policy.dispatched(agent, demand)
        guard = SlotGuard(agent, demand.needs_slot, self.clock(), self._release)
        agent.guards.add(guard)
        self._index.update(agent)  # _changed's, without its frame: twice per request
        return guard

    def _release(self, guard: SlotGuard, abandoned: bool) -> None:
        """Called by ``SlotGuard.release`` only, exactly once per guard."""
        agent = guard.agent
        agent.guards.discard(guard)
        agent.in_flight -= 1
        if guard.holds_slot:
            agent.reserved -= 1
            now = self.clock()
            if abandoned:
                if not agent.removed:
                    agent.settling.append(now + self._settle_timeout)
                    self._settling.add(agent)
            elif guard.aborted is None:  # a request cut short says nothing of the hold time
                agent.observe_hold(now - guard.reserved_at)
        if agent.removed:
            return  # nothing of it is counted any more, and nobody may be sent there
        self._index.update(agent)
        self._capacity_changed(agent)

    # -- failures ---------------------------------------------------------------------------

    def trip(self, agent: AgentController, reason: str) -> None:
        """Take an agent out of rotation until it reports healthy again."""
        agent.consecutive_failures += 1
        opening = agent.circuit_opened_at is None
        agent.circuit_opened_at = self.clock()
        self._changed(agent)
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

    def _capacity_changed(self, agent: AgentController | None) -> None:
        for listener in self._capacity_listeners:
            listener(agent)


class Naming(NamedTuple):
    names: frozenset[str]
    """Every name of every model the verified agents serve."""
    ids: frozenset[str]
    allow_unknown: bool


def accepts(model: str, naming: Naming) -> bool:
    """``AgentControllerPool.accepts`` from a copy of its ``naming``."""
    return model in naming.names or naming.allow_unknown or len(naming.ids) <= 1


def _describe(status: Status) -> str:
    text = f"{status.state.value}, {status.slots_idle} idle / {status.slots_total} slots"
    return f"{text} ({status.error})" if status.error else text
