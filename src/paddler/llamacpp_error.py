"""llama.cpp's error body, ``{"error": {"code", "message", "type"}}``, as both the agent (reading
llama.cpp's answers to its polls) and the balancer (describing a failed answer) read it."""

from __future__ import annotations

import json


def error_message(body: bytes) -> str | None:
    """The ``error.message`` of a llama.cpp error body, or None if the body is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        message = document["error"].get("message")
        if isinstance(message, str):
            return message
    return None
