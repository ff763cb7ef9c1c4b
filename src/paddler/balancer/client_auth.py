"""Client authentication on the proxy port: a request without a valid API key gets 401.

The rules are llama.cpp's own (``--api-key``), so that a client cannot tell the balancer from a
single llama.cpp: ``/health`` and ``/v1/health`` are public, a CORS preflight (``OPTIONS``) passes
without a key because browsers send none, and every other route needs one (see
``api_keys.presented_key`` for the headers). A refused request is answered here, before any body
is read, any slot is reserved or any buffer place is taken; its log line names the request and
how the key was presented, never the key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from paddler.balancer import errors
from paddler.balancer.api_keys import ApiKeys, presented_key
from paddler.balancer.request_id import request_id

log = logging.getLogger("paddler.requests")

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})

KEY_ID = web.RequestKey("paddler_api_key_id", str)
"""Where an accepted request carries the id of its key, for the proxy's ``RequestRecord``."""


def _how_presented(request: web.Request) -> str:
    if request.headers.get("Authorization"):
        return "a wrong key in Authorization"
    if request.headers.get("X-Api-Key"):
        return "a wrong key in X-Api-Key"
    return "no API key"


def client_auth(
    keys: ApiKeys, on_refused: Callable[[web.Request], None] | None = None
) -> Middleware:
    """The middleware that lets through only requests with one of ``keys`` (read at each
    request, so that a reload applies at once); ``on_refused`` hears of each 401."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
            return await handler(request)
        key_id = keys.check(presented_key(request.headers))
        if key_id is None:
            if on_refused is not None:
                on_refused(request)
            return _refuse(request)
        request[KEY_ID] = key_id
        return await handler(request)

    return authenticate


def _refuse(request: web.Request) -> web.Response:
    identifier = request_id(request)
    how = _how_presented(request)
    log.warning(
        "request %s %s %s -> 401: %s",
        identifier,
        request.method,
        request.path,
        how,
        extra={
            "request_id": identifier,
            "method": request.method,
            "path": request.path,
            "status": 401,
            "outcome": "unauthorized",
        },
    )
    response = errors.invalid_api_key().response()
    response.headers["X-Request-Id"] = identifier
    return response
