"""This balancer's agents, written to the shared fleet (``--state redis://``; docs/ha.md).

The agents that report to this balancer live in its own pool, as with one balancer: it verifies
them, applies their reports, sweeps the silent ones. Each change the pool makes to one of them
(``AgentControllerPool.on_change``) is written to Redis: its record (``redis_registry``, which
every replica follows) and its slots (``redis_leases.report``, which also gives the slots a
report freed to the fleet's waiting requests). Writes are coalesced per agent, newest state
first: a burst of reports from one agent costs one write per round trip, never a queue of them.
A quiet agent's record is written again every third of ``--agent-stale-after``, so that it does
not expire while its agent is connected here.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.model_names import names_of
from paddler.balancer.fleet.redis_leases import RedisLeases
from paddler.balancer.fleet.redis_registry import AgentRecord, RedisRegistry

log = logging.getLogger(__name__)

_RETRY_DELAY = 1.0
"""How long to wait before writing again after Redis failed a write."""


def record_of(agent: AgentController, owner: str) -> AgentRecord:
    address = agent.address
    return AgentRecord(
        id=agent.id,
        name=agent.name,
        scheme=address.scheme,
        host=address.host,
        port=address.port,
        models=agent.status.models,
        slots_total=agent.slots_total,
        state=agent.status.state.value if not agent.circuit_open else "circuit_open",
        error=agent.status.error,
        verified=agent.verified,
        owner=owner,
    )


class RedisPublisher:
    def __init__(
        self,
        pool: AgentControllerPool,
        registry: RedisRegistry,
        leases: RedisLeases,
        stale_after: float,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._leases = leases
        self._stale_after = stale_after
        self._dirty: dict[str, AgentController] = {}
        """Agents changed since their last write, by id (the newest state is what is written)."""
        self._wake = asyncio.Event()
        pool.on_change(self._changed)

    def _changed(self, agent: AgentController) -> None:
        self._dirty[agent.id] = agent
        self._wake.set()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Write each change as it comes, and every agent again before it would expire."""
        keepalive = asyncio.create_task(self._keep_alive())
        try:
            while not shutdown.is_set():
                waking = asyncio.ensure_future(self._wake.wait())
                stopping = asyncio.ensure_future(shutdown.wait())
                await asyncio.wait({waking, stopping}, return_when=asyncio.FIRST_COMPLETED)
                waking.cancel()
                stopping.cancel()
                self._wake.clear()
                await self._flush()
            await self._flush()  # what changed last (a deregistration) is said before leaving
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    async def _flush(self) -> None:
        while self._dirty:
            agent_id, agent = next(iter(self._dirty.items()))
            del self._dirty[agent_id]
            try:
                await self._write(agent)
            except (RedisError, OSError) as error:
                self._dirty.setdefault(agent_id, agent)  # written when Redis is back
                log.warning("could not write agent %s to Redis: %s", agent.name, error)
                await asyncio.sleep(_RETRY_DELAY)

    async def _write(self, agent: AgentController) -> None:
        if agent.removed:
            await self._registry.remove(agent.id)
            return
        await self._registry.put(record_of(agent, self._registry.replica))
        names = sorted(frozenset().union(*map(names_of, agent.status.models)))
        await self._leases.report(
            agent.id,
            slots_total=agent.slots_total,
            slots_processing=agent.status.slots_processing,
            usable=agent.usable(),
            models=names,
        )

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._stale_after / 3)
            for agent in self._pool.agents():
                self._dirty.setdefault(agent.id, agent)
            self._wake.set()
