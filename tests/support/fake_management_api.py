"""A balancer's read-only management API with answers set by the test.

For what the real balancer cannot be made to do on demand: stop and come back on the same port,
answer nonsense, or serve traffic history with chosen numbers.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web


def agent_json(name: str, port: int, idle: int, processing: int = 0, **fields: Any) -> Any:
    """One agent as ``GET /api/v1/agents`` lists it."""
    agent = {
        "id": f"{name}@127.0.0.1:{port}",
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "state": "ok",
        "error": None,
        "models": ["tiny"],
        "slots_total": idle + processing,
        "slots_idle": idle,
        "slots_processing": processing,
        "slots_reported_processing": processing,
        "requests_in_flight": 0,
        "circuit_open": False,
        "last_report_at": 1_700_000_000.0,
        "last_report_age_seconds": 0.2,
        "registered_at": 1_700_000_000.0,
        "verified": True,
        "verification": "/props total_slots",
    }
    agent.update(fields)
    return agent


class FakeManagementApi:
    """Serves ``agents`` and, unless it is None, ``stats``; ``status`` overrides both answers."""

    def __init__(self) -> None:
        self.agents: Any = {
            "agents": [],
            "slots_idle": 0,
            "slots_processing": 0,
            "requests_buffered": 0,
        }
        self.stats: Any = None
        self.status = 200
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def start(self) -> None:
        """Listen, on the same port as before if it was started already."""
        app = web.Application()
        app.router.add_get("/api/v1/agents", self._agents)
        app.router.add_get("/api/v1/stats", self._stats)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # So that a restart can take the same port back while old connections sit in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        await web.SockSite(self._runner, listener).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _agents(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status, text="broken")
        return web.json_response(self.agents)

    async def _stats(self, request: web.Request) -> web.Response:
        if self.stats is None:
            raise web.HTTPNotFound()
        return web.json_response(self.stats)


@contextlib.asynccontextmanager
async def fake_management_api() -> AsyncIterator[FakeManagementApi]:
    api = FakeManagementApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()
