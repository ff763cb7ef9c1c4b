"""``GET /v1/models`` (and ``/models``) on the proxy port, answered by the balancer itself.

The fleet's models in OpenAI's list shape (see ``fleet.model_listing`` for each entry).
"""

from __future__ import annotations

from paddler.balancer.fleet.state import Fleet
from paddler.balancer.proxy.client_exchange import Answer, json_answer


class ModelListing:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def answer(self) -> Answer:
        return json_answer({"object": "list", "data": await self._fleet.model_listing()})
