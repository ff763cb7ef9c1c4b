"""Which llama.cpp routes generate, and therefore need a free slot; and route labels.

Everything else (tokenize, models, props, metrics, ...) is proxied to any usable agent without
taking a slot. The list follows llama.cpp's server routes; ``/v1/...`` and bare forms both exist.
Metrics label requests by route; any path that is not a known llama.cpp route is labelled
``other``, so that clients cannot create labels at will.
"""

from __future__ import annotations

_GENERATING_PATHS = frozenset(
    {
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/responses",
        "/v1/responses",
        "/v1/messages",
        "/infill",
        "/embedding",
        "/embeddings",
        "/v1/embeddings",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/reranking",
    }
)


def needs_slot(method: str, path: str) -> bool:
    """Whether a request occupies a llama.cpp slot while it runs."""
    if method != "POST":
        return False
    normalized = path.rstrip("/") or "/"
    return normalized in _GENERATING_PATHS


_OTHER_KNOWN_PATHS = frozenset(
    {
        "/health",
        "/v1/health",
        "/slots",
        "/props",
        "/metrics",
        "/models",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/lora-adapters",
        "/v1/messages/count_tokens",
    }
)


def route_label(path: str) -> str:
    """``path`` if it is a llama.cpp route, ``/slots/{id}`` for slot actions, else ``other``."""
    normalized = path.rstrip("/") or "/"
    if normalized in _GENERATING_PATHS or normalized in _OTHER_KNOWN_PATHS:
        return normalized
    if normalized.startswith("/slots/"):
        return "/slots/{id}"
    return "other"
