"""Which server gets a request: the ``--routing`` policies, and what they learn from responses.

The pool hands a policy the *candidates* for a request: usable agents that serve the model it
names and that it has not already failed on, busy or not. The policy returns the agent to send it
to, which must have a free slot, or None to keep the request waiting. Both policies never send a
request that needs a slot to a server without one: llama.cpp would queue it out of sight.

``slots``: the agent with the most free slots, then the fewest busy ones.

``prefix`` (documented in docs/routing.md): pick the agent where the request is expected to be
*served soonest*, in seconds, using what was measured from llama.cpp's own responses::

    service(a) = uncached_tokens(a) / prefill_rate * (1 + busy(a) / slots(a))
    cost(a)    = service(a)                            if a has a free slot
               = service(a) + expected_wait(a)         if it has none
    expected_wait(a) = slot_hold(a) * (waiting_for(a) + 1) / slots(a)

``uncached_tokens`` is the part of the prompt the prefix index does not place on that server;
``prefill_rate`` and ``slot_hold`` are each server's measured prompt tokens per second and time
a request holds a slot; ``waiting_for`` counts the requests already waiting for it. So a prefix
is sticky while its server has room, a full sticky server is waited for only while the measured
numbers say that waiting is cheaper than recomputing the prefix elsewhere (and never longer than
the saving), and a hot prefix spills over to other servers (which then hold it too) as soon as
its queue makes waiting dearer than recomputing. Until a server's numbers are measured, waiting
for it is never chosen.

Candidates come from indexes, not from a scan of the fleet (see ``capacity_index``): agents are
ranked by free slots, then busy slots, then each policy's ``tie_break``; each policy says how
many of the best-ranked it wants to compare (``shortlist``), and the prefix policy adds the
servers its index names as holding the prompt's first block, the only ones a match can name.
``slots`` needs only the first agent by rank: its rank is its choice. ``prefix`` compares the
prompt's owners with the ``PREFIX_BREADTH`` best-ranked agents (its tie-break: the fewest prompt
characters routed there), which are where a prompt nobody holds would go.

The buffer asks twice (``spill``): first the waiters that hold their prefix on the server
that freed a slot may only take a slot there (or on one as good), then queue heads may spill. A
slot that frees on a server thus goes to a request that wants that server before any other
request spills onto it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.prefix_index import NO_MATCH, Match, PrefixIndex, prefix_chain

_DEFAULT_PREFILL_RATE = 1000.0
"""Prompt tokens per second assumed before any was measured; only ratios matter then (waiting,
which compares with measured slot times, is never chosen on it)."""

_SMOOTHING = 0.2
"""Weight of the newest measurement in the running averages."""

_EQUIVALENT = 0.1
_EQUIVALENT_SECONDS = 0.005
"""Service times within 10 % (plus 5 ms) of the cheapest count as equal."""

PREFIX_BREADTH = 4
"""How many of the best-ranked agents the prefix policy compares, besides the prompt's owners."""


@dataclass(eq=False, slots=True)
class Demand:
    """One request's needs, as routing sees them; it lives as long as the request."""

    needs_slot: bool
    model: str | None = None
    route: str | None = None
    """The llama.cpp route (``routes.route_label``): servers known to lack it are avoided."""
    prompt_chars: int = 0
    chain: tuple[int, ...] = ()
    exclude: frozenset[str] = frozenset()
    waiting_for: AgentController | None = None
    """The full agent this request chose to wait for (prefix policy)."""
    waiting_since: float | None = None
    revisit_at: float | None = None
    """When the policy wants to decide again even if no capacity changed."""
    match: Match = NO_MATCH
    """The index's prediction for the agent the request was sent to."""
    matches: dict[int, Match] = field(default_factory=dict)
    matched_at: tuple[int, tuple[int, ...]] | None = None
    """The index version and cache keys ``matches`` was computed for: the buffer asks again
    at every capacity change, usually of an index that did not change."""

    @classmethod
    def of(
        cls,
        needs_slot: bool,
        model: str | None,
        prompt: str | None,
        route: str | None = None,
        prompt_chars: int | None = None,
    ) -> Demand:
        """``prompt_chars``: the whole prompt's length, when ``prompt`` is only its start."""
        if not prompt or not needs_slot:
            return cls(needs_slot, model, route)
        chars = len(prompt) if prompt_chars is None else max(prompt_chars, len(prompt))
        return cls(needs_slot, model, route, chars, prefix_chain(prompt))


class RoutingPolicy(Protocol):
    stats: RoutingStats

    @property
    def index(self) -> PrefixIndex | None:
        """The prefix index the policy routes by, if it routes by one (its gauges in
        ``/metrics``)."""
        ...

    def tie_break(self, agent: AgentController) -> int:
        """What orders agents with as many free and busy slots (lower first; see
        ``capacity_index``). It may change only when the agent is dispatched to or
        forgotten."""
        ...

    def shortlist(self, demand: Demand) -> tuple[int, tuple[int, ...]]:
        """How many of the best-ranked agents to compare for ``demand``, and the cache keys of
        the others to compare them with."""
        ...

    def preferred(self, demand: Demand) -> int | None:
        """The cache key of the server that holds the most of the demand's prompt, as of its
        last ``choose`` (None: no server does, or the policy does not care)."""
        ...

    def choose(
        self,
        candidates: Sequence[AgentController],
        demand: Demand,
        now: float,
        *,
        spill: bool = True,
    ) -> AgentController | None: ...

    def dispatched(self, agent: AgentController, demand: Demand) -> None: ...

    def abandoned(self, demand: Demand) -> None: ...

    def learn(self, agent: AgentController, demand: Demand, report: CacheReport) -> None: ...

    def forget(self, agent_cache_key: int) -> None: ...


_RECENT_REPORTS = 256


@dataclass
class RoutingStats:
    """What routing decided and what llama.cpp reported, for ``/metrics``.

    Prompt tokens are llama.cpp's own counts (``cache_n + prompt_n``); predicted cached tokens
    are what the prefix index expected, converted to tokens with that request's own ratio of
    characters to tokens. Totals are since start; the ratios cover the last 256 reports.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    predicted_cached_tokens: float = 0.0
    reports: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    recent: deque[tuple[int, int, float]] = field(
        default_factory=lambda: deque(maxlen=_RECENT_REPORTS)
    )

    def decided(self, reason: str) -> None:
        self.decisions[reason] = self.decisions.get(reason, 0) + 1

    def reported(self, report: CacheReport, predicted: float) -> None:
        self.reports += 1
        self.prompt_tokens += report.prompt_tokens
        self.cached_tokens += report.cached_tokens
        self.predicted_cached_tokens += predicted
        self.recent.append((report.prompt_tokens, report.cached_tokens, predicted))

    def recent_hit_ratio(self) -> tuple[float, float]:
        """(actual, predicted) share of prompt tokens found in cache, over recent reports."""
        total = sum(prompt for prompt, _, _ in self.recent)
        if not total:
            return 0.0, 0.0
        actual = sum(cached for _, cached, _ in self.recent)
        predicted = sum(guess for _, _, guess in self.recent)
        return actual / total, predicted / total


class SlotsPolicy:
    """The most free slots, then the fewest busy, then by name: load only."""

    def __init__(self) -> None:
        self.stats = RoutingStats()
        self.index: PrefixIndex | None = None

    def tie_break(self, agent: AgentController) -> int:
        return 0

    def shortlist(self, demand: Demand) -> tuple[int, tuple[int, ...]]:
        return 1, ()

    def preferred(self, demand: Demand) -> int | None:
        return None

    def choose(
        self,
        candidates: Sequence[AgentController],
        demand: Demand,
        now: float,
        *,
        spill: bool = True,
    ) -> AgentController | None:
        return least_loaded(candidates, demand.needs_slot)

    def dispatched(self, agent: AgentController, demand: Demand) -> None:
        if demand.needs_slot:
            self.stats.decided("load")

    def abandoned(self, demand: Demand) -> None:
        pass

    def learn(self, agent: AgentController, demand: Demand, report: CacheReport) -> None:
        self.stats.reported(report, 0.0)
        agent.observe_prefill(report)

    def forget(self, agent_cache_key: int) -> None:
        pass


def least_loaded(candidates: Sequence[AgentController], needs_slot: bool) -> AgentController | None:
    if len(candidates) == 1:  # the usual shortlist (``SlotsPolicy``): nothing to compare
        (only,) = candidates
        return None if needs_slot and only.free_slots() < 1 else only
    best: AgentController | None = None
    best_key: tuple[int, int, str, str] | None = None
    for agent in candidates:
        free = agent.free_slots()
        if needs_slot and free < 1:
            continue
        key = (-free, agent.busy_slots(), agent.name, agent.url)
        if best_key is None or key < best_key:
            best, best_key = agent, key
    return best


class PrefixPolicy:
    """Expected cache savings against load, in seconds (see the module docstring)."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.stats = RoutingStats()
        self._chars_per_token = 1.0
        self._measured_chars_per_token = False

    def tie_break(self, agent: AgentController) -> int:
        return self.index.routed(agent.cache_key)

    def shortlist(self, demand: Demand) -> tuple[int, tuple[int, ...]]:
        if not demand.needs_slot or not demand.chain:
            return 1, ()
        return PREFIX_BREADTH, self.index.owners(demand.chain)

    def preferred(self, demand: Demand) -> int | None:
        if not demand.needs_slot or not demand.chain:
            return None
        owners = self.index.owners(demand.chain)
        if not owners:
            return None
        best: int | None = None
        blocks = 0
        for key, match in self.index.match(demand.chain, owners).items():
            if match.blocks > blocks:
                best, blocks = key, match.blocks
        return best

    def choose(
        self,
        candidates: Sequence[AgentController],
        demand: Demand,
        now: float,
        *,
        spill: bool = True,
    ) -> AgentController | None:
        if not demand.needs_slot or not demand.chain:
            return least_loaded(candidates, demand.needs_slot)
        matches = self._matches(demand, candidates)
        rates = [agent.prefill_rate for agent in candidates if agent.prefill_rate is not None]
        rate = sum(rates) / len(rates) if rates else None
        free: list[tuple[float, AgentController]] = []
        best_full: tuple[float, float] | None = None  # (cost, service)
        best_full_agent: AgentController | None = None
        best_service = math.inf
        for agent in candidates:
            match = matches.get(agent.cache_key, NO_MATCH)
            service = self._service_seconds(agent, demand.prompt_chars - match.chars, rate)
            best_service = min(best_service, service)
            if agent.free_slots() > 0:
                free.append((service, agent))
            else:
                wait = self._expected_wait(agent, demand) if rate is not None else None
                if wait is not None and (best_full is None or service + wait < best_full[0]):
                    best_full, best_full_agent = (service + wait, service), agent
        if not spill:
            # Only the preferred server, or one as good, may take the request now.
            free = [entry for entry in free if entry[0] <= _equivalent(best_service)]
            preferred, _ = self._cheapest(free)
            if preferred is not None:
                self._stop_waiting(demand)
                demand.match = matches.get(preferred.cache_key, NO_MATCH)
            return preferred
        best_free_agent, best_free_cost = self._cheapest(free)
        if best_free_agent is None:
            # Nothing is free: wait, and decide again when a slot frees anywhere.
            self._stop_waiting(demand)
            return None
        if best_full is not None and best_full_agent is not None and best_full[0] < best_free_cost:
            saving = best_free_cost - best_full[1]
            if demand.waiting_for is not best_full_agent:
                self._stop_waiting(demand)
                demand.waiting_for = best_full_agent
                demand.waiting_since = now
                best_full_agent.awaited += 1
            assert demand.waiting_since is not None
            if now - demand.waiting_since < saving:
                demand.revisit_at = demand.waiting_since + saving
                return None
        self._stop_waiting(demand)
        demand.match = matches.get(best_free_agent.cache_key, NO_MATCH)
        return best_free_agent

    def dispatched(self, agent: AgentController, demand: Demand) -> None:
        self._stop_waiting(demand)
        if not demand.needs_slot:
            return
        if demand.chain:
            self.index.record(agent.cache_key, demand.chain, demand.prompt_chars)
        self.stats.decided("prefix" if demand.match.blocks else "load")

    def abandoned(self, demand: Demand) -> None:
        self._stop_waiting(demand)

    def learn(self, agent: AgentController, demand: Demand, report: CacheReport) -> None:
        agent.observe_prefill(report)
        predicted = 0.0
        if demand.chain and report.prompt_tokens:
            chars_per_token = demand.prompt_chars / report.prompt_tokens
            self._observe_chars_per_token(chars_per_token)
            predicted = min(demand.match.chars, demand.prompt_chars) / chars_per_token
            cached_chars = int(report.cached_tokens * chars_per_token)
            self.index.learn(agent.cache_key, demand.match, cached_chars)
        self.stats.reported(report, predicted)

    def forget(self, agent_cache_key: int) -> None:
        self.index.forget(agent_cache_key)

    def _matches(self, demand: Demand, candidates: Sequence[AgentController]) -> dict[int, Match]:
        keys = tuple(agent.cache_key for agent in candidates)
        if demand.matched_at != (self.index.version, keys):
            demand.matches = self.index.match(demand.chain, keys)
            demand.matched_at = (self.index.version, keys)
        return demand.matches

    def _cheapest(
        self, free: list[tuple[float, AgentController]]
    ) -> tuple[AgentController | None, float]:
        """The agent to use among those with a free slot, and its cost.

        Costs within ``_EQUIVALENT`` of the cheapest are a tie (measured rates are noisy); a tie
        goes to the least busy agent, then to the one that was sent the fewest prompt characters,
        so that new prefixes spread over the fleet's caches instead of piling up on one.
        """
        if not free:
            return None, math.inf
        limit = _equivalent(min(service for service, _ in free))
        service, agent = min(
            (entry for entry in free if entry[0] <= limit),
            key=lambda entry: (
                entry[1].busy_slots(),
                self.index.routed(entry[1].cache_key),
                entry[0],
                entry[1].name,
                entry[1].url,
            ),
        )
        return agent, service

    def _service_seconds(
        self, agent: AgentController, uncached_chars: int, rate: float | None
    ) -> float:
        tokens = max(0, uncached_chars) / self._chars_per_token
        rate = rate or _DEFAULT_PREFILL_RATE
        load = agent.busy_slots() / max(1, agent.slots_total)
        return tokens / rate * (1 + load)

    def _expected_wait(self, agent: AgentController, demand: Demand) -> float | None:
        if agent.slot_hold is None:
            return None
        ahead = agent.awaited - (1 if demand.waiting_for is agent else 0)
        return agent.slot_hold * (ahead + 1) / max(1, agent.slots_total)

    def _stop_waiting(self, demand: Demand) -> None:
        if demand.waiting_for is not None:
            demand.waiting_for.awaited -= 1
        demand.waiting_for = None
        demand.waiting_since = None
        demand.revisit_at = None

    def _observe_chars_per_token(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            return
        if self._measured_chars_per_token:
            self._chars_per_token += _SMOOTHING * (value - self._chars_per_token)
        else:
            self._chars_per_token, self._measured_chars_per_token = value, True


def _equivalent(seconds: float) -> float:
    """The highest cost that still counts as equal to ``seconds``."""
    return seconds * (1 + _EQUIVALENT) + _EQUIVALENT_SECONDS


def make_policy(name: str, prefix_index_memory: int) -> SlotsPolicy | PrefixPolicy:
    if name == "prefix":
        return PrefixPolicy(PrefixIndex(prefix_index_memory))
    if name == "slots":
        return SlotsPolicy()
    raise ValueError(f"unknown routing policy {name!r}")
