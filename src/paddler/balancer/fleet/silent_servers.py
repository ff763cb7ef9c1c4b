"""Requests left on a server whose agent went silent: ended once they stop making progress.

An agent that stops reporting is removed after ``--agent-stale-after`` (see
``agent_controller_pool``), and removal only stops new requests: an agent can go quiet (restarted,
a network hiccup on its socket) while its llama.cpp goes on serving. But when the whole host
freezes (a paused VM, a machine swapping itself to death, a partition), the agent's silence is
the only signal there will ever be: its llama.cpp cannot report itself unreachable, and the
requests running there would wait for ``--upstream-read-timeout`` (minutes).

So the requests of an agent removed for silence are watched: each sweep reads how many response
bytes each has received (``SlotGuard.received``; a request still waiting for its response
headers counts as none), and one that received nothing for ``stale_after`` seconds is aborted, as
an ``unreachable`` report would: a stream ends with the SSE error event, a request waiting for
headers goes to another server. Requests that keep receiving bytes run on. An agent that
registers again at the same address proves its host alive, and its old requests are left alone.

Nothing is added per chunk: the count is aiohttp's own (``StreamReader.total_bytes``), read only
here, and only for the requests of agents that went silent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paddler.balancer.fleet.agent_controller import AgentController
    from paddler.balancer.fleet.slot_guard import SlotGuard

log = logging.getLogger(__name__)


class SilentServers:
    def __init__(self) -> None:
        self._agents: set[AgentController] = set()
        self._seen: dict[SlotGuard, tuple[int, float]] = {}
        """Each watched request's byte count, and since when it has been that."""

    def watch(self, agent: AgentController) -> None:
        """``agent`` was removed because it stopped reporting: watch what still runs there."""
        if agent.guards:
            self._agents.add(agent)

    def alive(self, url: str) -> None:
        """An agent registered at ``url``: whatever ran there before may run on."""
        self._agents = {agent for agent in self._agents if agent.address.url != url}

    def check(self, now: float, stale_after: float) -> None:
        """Abort the watched requests that received nothing for ``stale_after`` seconds."""
        seen: dict[SlotGuard, tuple[int, float]] = {}
        for agent in list(self._agents):
            if not agent.guards:
                self._agents.discard(agent)
                continue
            for guard in list(agent.guards):
                count = guard.received.total_bytes if guard.received is not None else -1
                previous = self._seen.get(guard)
                if previous is None or previous[0] != count:
                    seen[guard] = (count, now)
                    continue
                if now - previous[1] < stale_after:
                    seen[guard] = previous
                    continue
                reason = (
                    f"{agent.name} stopped reporting and its llama.cpp sent nothing for "
                    f"{now - previous[1]:.0f}s"
                )
                log.warning("agent %s: ending a request running there: %s", agent.name, reason)
                guard.abort(reason)
        self._seen = seen
