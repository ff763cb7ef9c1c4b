"""The id that follows a request through logs, traces and the response.

A client's own ``X-Request-Id`` is kept when it is reasonable (short, printable, no spaces), so
that ids can be correlated across systems; otherwise the balancer makes one.
"""

from __future__ import annotations

import re
import secrets

from aiohttp import web

_ACCEPTABLE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(request: web.Request) -> str:
    offered = request.headers.get("X-Request-Id", "")
    if _ACCEPTABLE.match(offered):
        return offered
    return secrets.token_hex(8)
