"""The shape of every error the balancer answers itself: llama.cpp's (and OpenAI's).

``{"error": {"code": <http status>, "message": <text>, "type": <llama.cpp error type>}}``.
It imports nothing of the balancer, so that the data plane (``upstream``) can end a broken
stream with it; which failure gets which status is decided in ``errors`` alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class ApiError(Exception):
    status: int
    message: str
    type: str
    retry_after: int | None = None

    def body(self) -> dict[str, dict[str, object]]:
        return {"error": {"code": self.status, "message": self.message, "type": self.type}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)

    def sse_event(self) -> bytes:
        """The error as a server-sent event, for a stream whose headers were already sent."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def stream_interrupted(detail: str) -> ApiError:
    """What a client of a stream gets when the server breaks off mid-answer."""
    return ApiError(
        502, f"the llama.cpp server failed: stream interrupted ({detail})", "server_error"
    )
