"""Every error the balancer itself answers: the one place where a failure becomes an HTTP status.

The shape (llama.cpp's and OpenAI's) is ``api_error.ApiError``.
"""

from __future__ import annotations

from paddler.balancer.api_error import ApiError
from paddler.balancer.fleet.request_buffer import (
    BufferFull,
    BufferRejection,
    BufferTimeout,
    ShuttingDown,
    UnknownModel,
)

__all__ = ["ApiError"]


def from_buffer(rejection: BufferRejection) -> ApiError:
    if isinstance(rejection, BufferFull):
        # 503, not 429: the fleet is out of capacity, the client did nothing wrong. OpenAI SDKs
        # retry both, honouring Retry-After.
        return ApiError(503, str(rejection), "unavailable_error", retry_after=1)
    if isinstance(rejection, BufferTimeout):
        return ApiError(504, str(rejection), "unavailable_error")
    if isinstance(rejection, ShuttingDown):
        return ApiError(503, str(rejection), "unavailable_error", retry_after=1)
    if isinstance(rejection, UnknownModel):
        return unknown_model(rejection.model, rejection.served)
    return ApiError(503, str(rejection), "unavailable_error", retry_after=1)


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than the limit of {limit} bytes", "invalid_request_error"
    )


def out_of_body_memory(limit: int) -> ApiError:
    return ApiError(
        503,
        f"the balancer already holds {limit} bytes of request bodies; retry shortly",
        "unavailable_error",
        retry_after=1,
    )


def body_stalled(timeout: float) -> ApiError:
    return ApiError(
        408,
        f"no part of the request body arrived for {timeout:g}s (--client-body-timeout)",
        "invalid_request_error",
    )


def upstream_failed(detail: str) -> ApiError:
    return ApiError(502, f"the llama.cpp server failed: {detail}", "server_error")


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong management token", "authentication_error")


def unknown_model(model: str, served: list[str]) -> ApiError:
    listed = ", ".join(repr(name) for name in served[:10])
    if len(served) > 10:
        listed += f" and {len(served) - 10} more"
    return ApiError(
        404,
        f"the model {model!r} is not served by this fleet, which serves {listed}. "
        "GET /v1/models lists the models and the names each answers to; a balancer started "
        "with --allow-unknown-models sends requests for other names to any server instead",
        "not_found_error",
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error")


def invalid_api_key() -> ApiError:
    """A client without a valid key: llama.cpp's own answer, word for word."""
    return ApiError(401, "Invalid API Key", "authentication_error")
