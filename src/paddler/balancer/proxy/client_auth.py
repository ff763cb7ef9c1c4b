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

from paddler.balancer import errors
from paddler.balancer.proxy.api_keys import ApiKeys, presented_key
from paddler.balancer.proxy.client_exchange import Answer, ClientRequest, error_answer
from paddler.balancer.proxy.request_id import request_id

log = logging.getLogger("paddler.requests")

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


def _how_presented(request: ClientRequest) -> str:
    if request.headers.get("Authorization"):
        return "a wrong key in Authorization"
    if request.headers.get("X-Api-Key"):
        return "a wrong key in X-Api-Key"
    return "no API key"


class ClientAuth:
    """Lets through only requests with one of ``keys`` (read at each request, so that a reload
    applies at once); ``on_refused`` hears of each 401."""

    def __init__(
        self, keys: ApiKeys, on_refused: Callable[[ClientRequest], None] | None = None
    ) -> None:
        self._keys = keys
        self._on_refused = on_refused

    def refusal(self, request: ClientRequest) -> Answer | None:
        """The 401 for ``request``, or None (and its ``key_id`` set) if it may pass."""
        if request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
            return None
        key_id = self._keys.check(presented_key(request.headers))
        if key_id is None:
            if self._on_refused is not None:
                self._on_refused(request)
            return _refuse(request)
        request.key_id = key_id
        return None


def _refuse(request: ClientRequest) -> Answer:
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
    answer = error_answer(errors.invalid_api_key())
    answer.headers["X-Request-Id"] = identifier
    return answer
