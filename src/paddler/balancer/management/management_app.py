"""The management port: agents connect here, operators read the fleet here.

- ``GET /health``: 200 ``{"status": "ok"}`` while the balancer runs (use it for liveness and
  readiness probes: the balancer can buffer requests even with no agent, which is how a fleet
  scales up from zero);
- ``GET /api/v1/agents``: every agent, its address, slots, state, error and last report, and
  whether the balancer verified its address (``verified``; ``verification`` says why not, or what
  bounds its slots; an unverified agent counts no slot); see ``agents_route``;
- ``GET /api/v1/stats``: requests, errors, buffered requests and slots, second by second, over
  the last ten minutes (see ``stats_history`` for the contract);
- ``GET /dashboard``: a live web view of all that, when the dashboard is enabled
  (see ``web_dashboard``);
- ``GET /metrics``: Prometheus metrics (see ``prometheus_metrics``);
- ``GET /api/v1/autoscaling``: how many servers the fleet needs now (see ``autoscaling``);
- ``GET /api/v1/agents/socket``: the agents' WebSocket (see ``agent_socket``).

The agents, the metrics' fleet gauges and the autoscaling advice are read from one shared fleet
reading (``fleet_view``), which keeps their cost off the requests' event loop.

Nothing here shows a token or an API key.
"""

from __future__ import annotations

from aiohttp import web

from paddler import protocol
from paddler.balancer.management.agent_socket import AgentSocket
from paddler.balancer.management.agents_route import AgentsRoute
from paddler.balancer.management.autoscaling import AutoscalingRoute
from paddler.balancer.management.web_dashboard import WebDashboard
from paddler.balancer.observability.prometheus_metrics import PrometheusMetrics
from paddler.balancer.observability.stats_history import StatsHistory


class ManagementApp:
    def __init__(
        self,
        agents: AgentsRoute,
        socket: AgentSocket,
        stats: StatsHistory,
        metrics: PrometheusMetrics,
        autoscaling: AutoscalingRoute,
        *,
        dashboard: bool = False,
    ) -> None:
        self._agents = agents
        self._socket = socket
        self._stats = stats
        self._metrics = metrics
        self._autoscaling = autoscaling
        self._dashboard = WebDashboard() if dashboard else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/api/v1/agents", self._agents.handle)
        app.router.add_get("/api/v1/stats", self.stats)
        app.router.add_get("/api/v1/autoscaling", self._autoscaling.handle)
        app.router.add_get("/metrics", self._metrics.handle)
        if self._dashboard is not None:
            self._dashboard.add_routes(app)
        app.router.add_get(protocol.AGENT_SOCKET_PATH, self._socket.handle)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=self._stats.encoded(), content_type="application/json")
