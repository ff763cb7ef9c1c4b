"""The management port: agents connect here, operators read the fleet here.

- ``GET /health``: 200 ``{"status": "ok"}`` while the balancer runs (use it for liveness and
  readiness probes: the balancer can buffer requests even with no agent, which is how a fleet
  scales up from zero);
- ``GET /api/v1/agents``: every agent, its address, slots, state, error and last report, and
  whether the balancer verified its address (``verified``; ``verification`` says why not, or what
  bounds its slots; an unverified agent counts no slot);
- ``GET /api/v1/stats``: requests, errors, buffered requests and slots, second by second, over
  the last ten minutes (see ``stats_history`` for the contract);
- ``GET /dashboard``: a live web view of all that, when the dashboard is enabled
  (see ``web_dashboard``);
- ``GET /metrics``: Prometheus metrics (see ``prometheus_metrics``);
- ``GET /api/v1/autoscaling``: how many servers the fleet needs now (see ``autoscaling``);
- ``GET /api/v1/agents/socket``: the agents' WebSocket (see ``agent_socket``).

Nothing here shows a token or an API key.
"""

from __future__ import annotations

import time

from aiohttp import web

from paddler import protocol
from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.agent_socket import AgentSocket
from paddler.balancer.autoscaling import AutoscalingRoute
from paddler.balancer.prometheus_metrics import PrometheusMetrics
from paddler.balancer.request_buffer import RequestBuffer
from paddler.balancer.stats_history import StatsHistory
from paddler.balancer.web_dashboard import WebDashboard


class ManagementApp:
    def __init__(
        self,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        socket: AgentSocket,
        stats: StatsHistory,
        metrics: PrometheusMetrics,
        autoscaling: AutoscalingRoute,
        *,
        dashboard: bool = False,
    ) -> None:
        self._pool = pool
        self._buffer = buffer
        self._socket = socket
        self._stats = stats
        self._metrics = metrics
        self._autoscaling = autoscaling
        self._dashboard = WebDashboard() if dashboard else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/api/v1/agents", self.agents)
        app.router.add_get("/api/v1/stats", self.stats)
        app.router.add_get("/api/v1/autoscaling", self._autoscaling.handle)
        app.router.add_get("/metrics", self._metrics.handler())
        if self._dashboard is not None:
            self._dashboard.add_routes(app)
        app.router.add_get(protocol.AGENT_SOCKET_PATH, self._socket.handle)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._stats.as_json())

    async def agents(self, request: web.Request) -> web.Response:
        fleet = self._pool.snapshot()
        now = time.time()
        return web.json_response(
            {
                "agents": [
                    {
                        "id": agent.id,
                        "name": agent.name,
                        "url": agent.url,
                        "state": agent.state,
                        "error": agent.error,
                        "models": list(agent.models),
                        "slots_total": agent.slots_total,
                        "slots_idle": agent.slots_idle,
                        "slots_processing": agent.slots_processing,
                        "slots_reported_processing": agent.slots_reported_processing,
                        "requests_in_flight": agent.requests_in_flight,
                        "circuit_open": agent.circuit_open,
                        "last_report_at": now - agent.last_report_age,
                        "last_report_age_seconds": round(agent.last_report_age, 3),
                        "registered_at": agent.registered_at,
                        "verified": agent.verified,
                        "verification": agent.verification,
                    }
                    for agent in fleet.agents
                ],
                "slots_idle": fleet.slots_idle,
                "slots_processing": fleet.slots_processing,
                "requests_buffered": self._buffer.waiting,
            }
        )
