"""How many llama.cpp servers the fleet needs now: ``GET /api/v1/autoscaling``.

The rule, with ``S`` the mean number of slots per usable server and ``u`` the target utilization
(``--autoscaling-target-utilization``, 0.8 by default)::

    demand           = slots_busy + requests_buffered
    desired_servers  = ceil(demand / S / u)
    suggested_change = desired_servers - servers

- A buffered request is demand like a busy slot: it needs a slot now.
- Only usable servers count (llama.cpp ok, circuit closed), for servers and for slots.
- With no usable server, ``S`` is unknown: a server's slot count is learnt only when it registers.
  The rule then asks for exactly one server if there is any demand, and for none otherwise; once
  that server registers, its slots drive the rule. This is how a fleet scales up from zero.
- The suggestion never goes below zero servers. With no demand it is zero: keeping a floor is the
  autoscaler's choice (KEDA's ``minReplicaCount``, the HPA's ``minReplicas``).

``desired_servers`` is absolute, so that an autoscaler that already started a server which has not
registered yet does not start another one for the same demand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from aiohttp import web

from paddler.balancer.fleet.fleet_view import FleetView
from paddler.balancer.fleet.request_buffer import RequestBuffer

RULE = (
    "desired_servers = ceil((slots_busy + requests_buffered) / slots_per_server"
    " / target_utilization); with no usable server: 1 if any request is buffered, else 0"
)


@dataclass(frozen=True)
class AutoscalingAdvice:
    servers: int
    slots_total: int
    slots_busy: int
    requests_buffered: int
    utilization: float
    target_utilization: float
    slots_per_server: float | None
    desired_servers: int
    suggested_change: int
    rule: str = RULE


def advise(
    *,
    servers: int,
    slots_total: int,
    slots_busy: int,
    requests_buffered: int,
    target_utilization: float,
) -> AutoscalingAdvice:
    """Apply the rule above to one moment of the fleet."""
    if not 0 < target_utilization <= 1:
        raise ValueError("the target utilization must be above 0 and at most 1")
    demand = slots_busy + requests_buffered
    if servers > 0 and slots_total > 0:
        slots_per_server: float | None = slots_total / servers
        # Rounded first, so that float error (7 / 0.7 = 10.000000000000002) cannot add a server.
        desired = math.ceil(round(demand * servers / (slots_total * target_utilization), 9))
    else:
        slots_per_server = None
        desired = 1 if demand > 0 else 0
    return AutoscalingAdvice(
        servers=servers,
        slots_total=slots_total,
        slots_busy=slots_busy,
        requests_buffered=requests_buffered,
        utilization=round(slots_busy / slots_total, 4) if slots_total else 0.0,
        target_utilization=target_utilization,
        slots_per_server=slots_per_server,
        desired_servers=desired,
        suggested_change=desired - servers,
    )


class AutoscalingRoute:
    """``GET /api/v1/autoscaling``: the advice for the fleet view's totals (see ``fleet_view``)
    and the buffer as it is now, as JSON."""

    def __init__(self, view: FleetView, buffer: RequestBuffer, target_utilization: float) -> None:
        self._view = view
        self._buffer = buffer
        self._target_utilization = target_utilization

    async def handle(self, request: web.Request) -> web.Response:
        fleet = await self._view.totals()
        advice = advise(
            servers=fleet.usable_agents,
            slots_total=fleet.slots_total,
            slots_busy=fleet.slots_processing,
            requests_buffered=self._buffer.waiting,
            target_utilization=self._target_utilization,
        )
        return web.json_response(asdict(advice))
