"""A worker's copy of an agent (``--workers``): what the data plane needs of it, no counts.

The proxy, the upstream client and the observers read an agent's id, name and address; the
slots, the circuit and the reports live in the fleet host's pool alone. A worker keeps one
mirror per agent id it was sent to, so that the proxy's code is the same in both process
models.
"""

from __future__ import annotations

from typing import Any

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status

_MIRRORS_KEPT = 4096
"""Beyond this many, mirrors no request holds are forgotten (agents come and go)."""


class AgentMirrors:
    def __init__(self) -> None:
        self._mirrors: dict[str, AgentController] = {}

    def get(self, fields: list[Any]) -> AgentController:
        """The mirror of the agent ``[id, name, scheme, host, port]`` (``fleet_wire``)."""
        agent_id = str(fields[0])
        mirror = self._mirrors.get(agent_id)
        if mirror is None:
            if len(self._mirrors) >= _MIRRORS_KEPT:
                self._mirrors = {key: agent for key, agent in self._mirrors.items() if agent.guards}
            mirror = self._mirrors[agent_id] = mirror_of(fields)
        return mirror


def mirror_of(fields: list[Any]) -> AgentController:
    agent_id, name, scheme, host, port = fields
    address = Address(str(scheme), str(host), int(port))
    return AgentController(
        id=str(agent_id),
        name=str(name),
        address=address,
        status=Status(state=LlamaCppState.OK),
        last_report_at=0.0,
        registered_at=0.0,
        verified=True,
    )
