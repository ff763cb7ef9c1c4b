"""The usable agents, ordered by how much each can take now, per model name: what a pick walks.

A pick used to scan every agent and ask each whether it was usable, how many slots it had free
and which models it served: with 1,000 agents that was 65 % of the balancer's CPU per request
(issue 10). Here every usable agent is kept in sorted lists, one for the whole fleet and one per
model name it answers to, under its *rank*: ``(-free slots, busy slots, the routing policy's
tie-break, name, url)``. So the first agent of a list has the most free slots, and a list whose
first agent has none has no free slot at all. A pick reads the first few entries of one
list; an agent whose numbers change (a reservation, a release, a report, its circuit) is moved,
in O(log n): ``sortedcontainers.SortedList`` keeps its items in a list of short sorted lists.

The fleet's totals (usable agents, idle and processing slots, which ``/health`` shows) are kept
here too, updated with each move, so that reading them costs nothing whatever the fleet's size.

The pool calls ``update`` after every change of an agent that can change its rank, its models or
whether it is usable; nothing else writes here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from sortedcontainers import SortedList

from paddler.balancer.fleet.agent_controller import AgentController

_Entry = tuple[int, int, int, str, str, int]
"""``(-free_slots, busy_slots, tie_break, name, url, serial)``: the lower, the better; the
agent's serial keeps entries of equal rank distinct."""


_Placed = tuple[_Entry, frozenset[str], int, int, tuple[str, str, int]]
"""Where an agent stands: its entry in the lists of its model names, those names, its share of
the totals (idle, processing), and the end of its entry (name, url, serial), of which only the
name may change (a new registration at the same url). A plain tuple: ``update`` runs twice per request, and a NamedTuple is made by a Python
function."""


class CapacityIndex:
    def __init__(self, tie_break: Callable[[AgentController], int]) -> None:
        self._tie_break = tie_break
        self._lists: dict[str | None, SortedList[_Entry]] = {None: SortedList()}
        self._placed: dict[AgentController, _Placed] = {}
        self._agents: dict[int, AgentController] = {}
        """The placed agents by serial, which is the last element of their entry."""
        self._next_serial = itertools.count()
        self.slots_idle = 0
        self.slots_processing = 0

    @property
    def usable_agents(self) -> int:
        return len(self._placed)

    def update(self, agent: AgentController) -> None:
        """Place ``agent`` where its numbers put it now (nowhere if it is not usable)."""
        if agent.removed or not agent.usable():
            self.remove(agent)
            return
        previous = self._placed.get(agent)
        if previous is None:
            serial = next(self._next_serial)
            self._agents[serial] = agent
            identity = (agent.name, agent.url, serial)
        else:
            _, _, idle, processing, identity = previous
            if identity[0] != agent.name:  # renamed by a new registration (its url stays)
                identity = (agent.name, identity[1], identity[2])
            self.slots_idle -= idle
            self.slots_processing -= processing
        total = agent.slots_total
        busy = agent.busy_slots()
        free = total - busy if total > busy else 0
        entry: _Entry = (-free, busy, self._tie_break(agent), *identity)
        names = agent.model_names
        if previous is None or previous[0] != entry or previous[1] != names:
            if previous is not None:
                self._unlist(previous)
            self._lists[None].add(entry)
            for name in names:
                listed = self._lists.get(name)
                if listed is None:
                    listed = self._lists[name] = SortedList()
                listed.add(entry)
        processing = busy if busy < total else total
        self._placed[agent] = (entry, names, free, processing, identity)
        self.slots_idle += free
        self.slots_processing += processing

    def remove(self, agent: AgentController) -> None:
        """Take ``agent`` out of every list and out of the totals, if it is in them."""
        previous = self._placed.pop(agent, None)
        if previous is None:
            return
        _, _, idle, processing, identity = previous
        self._unlist(previous)
        self.slots_idle -= idle
        self.slots_processing -= processing
        del self._agents[identity[-1]]

    def ranked(self, model: str | None) -> Iterator[AgentController]:
        """The usable agents that answer to ``model`` (every usable agent for None), best
        first."""
        listed = self._lists.get(model)
        if listed is None:
            return iter(())
        agents = self._agents
        return (agents[entry[-1]] for entry in listed)

    def has_free(self, model: str | None) -> bool:
        """Whether some usable agent that answers to ``model`` has a free slot."""
        listed = self._lists.get(model)
        return listed is not None and bool(listed) and listed[0][0] < 0

    def has_usable(self, model: str | None) -> bool:
        return bool(self._lists.get(model))

    def _unlist(self, placed: _Placed) -> None:
        entry, names, _, _, _ = placed
        self._lists[None].remove(entry)
        for name in names:
            listed = self._lists[name]
            listed.remove(entry)
            if not listed:
                del self._lists[name]
