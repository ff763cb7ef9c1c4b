"""Which llama.cpp routes generate, and therefore need a free slot.

Everything else (tokenize, models, props, metrics, ...) is proxied to any usable agent without
taking a slot. The list follows llama.cpp's server routes; ``/v1/...`` and bare forms both exist.
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
