"""``GET /v1/models`` (and ``/models``) on the proxy port, answered by the balancer itself.

The fleet's models in OpenAI's list shape, one entry per model id (see ``model_names``), each
with a ``paddler`` object: the names it answers to, how many agents serve it, how many of them
are usable, and their slots.
"""

from __future__ import annotations

from aiohttp import web

from paddler.balancer.agent_controller_pool import AgentControllerPool


class ModelListing:
    def __init__(self, pool: AgentControllerPool) -> None:
        self._pool = pool

    async def handle(self, request: web.Request) -> web.Response:
        data = []
        for model, agents in sorted(self._pool.models().items()):
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
        return web.json_response({"object": "list", "data": data})
