"""Agents joining a pool in unit tests, with no socket and no verifier."""

from __future__ import annotations

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.config import Address
from paddler.protocol import Status

UNBOUNDED = 2 * 65536
"""A slot bound above anything a report can claim: what the agent reports is counted."""


def join(
    pool: AgentControllerPool,
    name: str,
    address: Address,
    status: Status,
    slot_bound: int = UNBOUNDED,
) -> tuple[AgentController, int]:
    """Register an agent and mark it verified, as the verifier does once it reached the
    address (``paddler.balancer.management.agent_verifier``); return the agent and its session."""
    agent, session = pool.register(name, address, status)
    assert pool.verified(agent, slot_bound, session=session)
    return agent, session
