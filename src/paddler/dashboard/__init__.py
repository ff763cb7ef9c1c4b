"""``paddler dashboard``: the fleet, live, in a terminal.

It only reads the balancer's management API (``GET /api/v1/agents`` and ``GET /api/v1/stats``):
``snapshot`` turns the JSON into typed values, ``client`` fetches it, ``widgets`` draws it and
``app`` polls and wires the two together.
"""
