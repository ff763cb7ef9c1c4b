"""What the proxy asks of the fleet, whichever process holds it.

The proxy port reserves slots, reports what servers did and reads the fleet's totals through a
``Fleet``. Two implementations:

- ``LocalFleet``: the pool and the buffer of this very process (one balancer process, the
  default);
- ``remote_fleet.RemoteFleet``: a worker's link to the process that holds them (``--workers``),
  over a Unix socket served by ``fleet_host``.

Either way one pool counts every slot and one buffer orders every waiter, so slot accounting
stays exact however many processes serve clients.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, NamedTuple, Protocol

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand, RoutingPolicy


class FleetHealth(NamedTuple):
    """What ``/health`` tells: the usable agents' slots and the waiting requests."""

    usable_agents: int
    slots_idle: int
    slots_processing: int
    requests_buffered: int


class Fleet(Protocol):
    @property
    def buffer_timeout(self) -> float:
        """How long a request may wait in the buffer (``--request-buffer-timeout``)."""
        ...

    def accepts(self, model: str) -> bool:
        """Whether a request naming ``model`` may be served (see ``agent_controller_pool``)."""
        ...

    def model_ids(self) -> list[str]:
        """The ids of the models the fleet serves, sorted."""
        ...

    async def acquire(self, demand: Demand, deadline: float) -> SlotGuard:
        """A reservation for ``demand``, waiting in the buffer until ``deadline`` (loop clock)
        if need be; raises the ``request_buffer`` rejections. (``acquire_now``, then ``wait``
        if it gave nothing.)"""
        ...

    def acquire_now(self, demand: Demand) -> SlotGuard | None:
        """A reservation at once if one can be had without waiting, else None: the request's
        common case, without a coroutine. Raises the rejections that need no wait."""
        ...

    async def wait(self, demand: Demand, deadline: float) -> SlotGuard:
        """A reservation for ``demand`` after ``acquire_now`` gave nothing, waiting in the
        buffer until ``deadline`` if need be."""
        ...

    async def has_candidates(
        self, exclude: Iterable[str], model: str | None, route: str | None
    ) -> bool:
        """Whether an agent outside ``exclude`` (ids) may serve ``model`` and ``route``."""
        ...

    def trip(self, agent: AgentController, reason: str) -> None: ...

    def record_failure(self, agent: AgentController, reason: str) -> None: ...

    def record_success(self, agent: AgentController) -> None: ...

    def lacks_route(self, agent: AgentController, route: str) -> None: ...

    def offers_route(self, agent: AgentController, route: str) -> None: ...

    def learn(self, guard: SlotGuard, demand: Demand, report: CacheReport) -> None:
        """What llama.cpp reported of its prompt cache for the request ``guard`` holds."""
        ...

    async def health(self) -> FleetHealth: ...

    async def model_listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models``' entries (see ``model_listing``)."""
        ...

    def close(self) -> None:
        """The proxy port is shutting down: refuse new work and answer the waiters."""
        ...


class LocalFleet:
    """The pool and buffer of this process, and the routing policy that learns from answers."""

    def __init__(
        self, pool: AgentControllerPool, buffer: RequestBuffer, policy: RoutingPolicy
    ) -> None:
        self.pool = pool
        self.buffer = buffer
        self._policy = policy

    @property
    def buffer_timeout(self) -> float:
        return self.buffer.timeout

    def accepts(self, model: str) -> bool:
        return self.pool.accepts(model)

    def model_ids(self) -> list[str]:
        return self.pool.model_ids()

    async def acquire(self, demand: Demand, deadline: float) -> SlotGuard:
        return await self.buffer.acquire(demand, deadline=deadline)

    def acquire_now(self, demand: Demand) -> SlotGuard | None:
        return self.buffer.acquire_now(demand)

    def wait(self, demand: Demand, deadline: float) -> Coroutine[Any, Any, SlotGuard]:
        # The buffer's coroutine itself, not one more around it: a waiting request holds
        # each frame of its chain, and thousands of them wait while a fleet starts.
        return self.buffer.wait(demand, deadline=deadline)

    async def has_candidates(
        self, exclude: Iterable[str], model: str | None, route: str | None
    ) -> bool:
        return self.pool.has_candidates(exclude, model, route)

    def trip(self, agent: AgentController, reason: str) -> None:
        self.pool.trip(agent, reason)

    def record_failure(self, agent: AgentController, reason: str) -> None:
        self.pool.record_failure(agent, reason)

    def record_success(self, agent: AgentController) -> None:
        self.pool.record_success(agent)

    def lacks_route(self, agent: AgentController, route: str) -> None:
        self.pool.lacks_route(agent, route)

    def offers_route(self, agent: AgentController, route: str) -> None:
        self.pool.offers_route(agent, route)

    def learn(self, guard: SlotGuard, demand: Demand, report: CacheReport) -> None:
        self._policy.learn(guard.agent, demand, report)

    async def health(self) -> FleetHealth:
        return health_of(self.pool, self.buffer)

    async def model_listing(self) -> list[dict[str, Any]]:
        return model_listing(self.pool)

    def close(self) -> None:
        self.buffer.close()


def health_of(pool: AgentControllerPool, buffer: RequestBuffer) -> FleetHealth:
    """O(1): the pool keeps the totals as agents change."""
    totals = pool.totals()
    return FleetHealth(
        totals.usable_agents, totals.slots_idle, totals.slots_processing, buffer.waiting
    )


def model_listing(pool: AgentControllerPool) -> list[dict[str, Any]]:
    """The fleet's models in OpenAI's list shape, one entry per model id (see
    ``model_names``), each with a ``paddler`` object: the names it answers to, how many agents
    serve it, how many of them are usable, and their slots."""
    data = []
    for model, agents in sorted(pool.models().items()):
        usable = [agent for agent in agents if agent.usable()]
        names = sorted(frozenset().union(*(agent.models[model] for agent in agents)))
        data.append(
            {
                "id": model,
                "object": "model",
                "created": int(min(agent.registered_at for agent in agents)),
                "owned_by": "llamacpp",
                "paddler": {
                    "names": names,
                    "agents": len(agents),
                    "agents_usable": len(usable),
                    "slots_total": sum(agent.slots_total for agent in usable),
                    "slots_idle": sum(agent.free_slots() for agent in usable),
                },
            }
        )
    return data
