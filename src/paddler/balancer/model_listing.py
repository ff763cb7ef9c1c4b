"""``GET /v1/models`` (and ``/models``) on the proxy port, answered by the balancer itself.

The fleet's models in OpenAI's list shape (see ``fleet.model_listing`` for each entry).
"""

from __future__ import annotations

from aiohttp import web

from paddler.balancer.fleet import Fleet


class ModelListing:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def handle(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": await self._fleet.model_listing()})
