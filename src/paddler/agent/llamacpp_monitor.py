"""Observes one llama.cpp server over HTTP and describes it as a ``protocol.Status``.

Contract: ``observe()`` never raises for anything llama.cpp or the network does (only
cancellation escapes). Each failure has its own state, so the operator and the balancer can
tell them apart:

- ``UNREACHABLE``: refused, reset, unresolvable, or no answer within the per-request timeout;
- ``LOADING``: 503 "Loading model" (llama.cpp answers that on every route while it loads);
- ``UNAUTHORIZED``: 401/403, the API key is missing or wrong;
- ``SLOTS_DISABLED``: 501 on ``/slots`` (llama.cpp was started with ``--no-slots``);
- ``ERROR``: any other status code or a body that is not what llama.cpp sends.

A failed observation still names the models llama.cpp served when it was last seen: a server
that restarts is still a server of that model to the balancer (which then keeps its model known
to clients), not a server of no model.

Each observation costs ``GET /health`` and ``GET /slots``. ``GET /props`` and ``GET /v1/models``
(slot count and model names) rarely change, so they are read once and read again only after a
sign that llama.cpp may have restarted: it was unreachable, loading or failing, its slot count
changed, its URL changed, or ``forget()`` was called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from paddler.llamacpp_error import error_message
from paddler.protocol import LlamaCppState, Status

_MAX_ERROR_CHARS = 2048
_MAX_MODELS = 64
_MAX_MODEL_NAME_CHARS = 512


@dataclass(frozen=True)
class _Props:
    total_slots: int
    models: tuple[str, ...]


class _Failure(Exception):
    """Why an observation stopped early; becomes the reported status."""

    def __init__(self, state: LlamaCppState, message: str) -> None:
        super().__init__(message)
        self.state = state
        self.message = message


class LlamaCppMonitor:
    """Turns llama.cpp's ``/health``, ``/slots``, ``/props`` and ``/v1/models`` into a Status.

    ``base_url`` is either fixed or a callable returning the current URL (``None`` while there is
    no server, for example while the agent's own llama.cpp restarts). ``timeout`` bounds each
    request separately.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str | Callable[[], str | None],
        api_key: str | None,
        timeout: float,
    ) -> None:
        self._session = session
        self._base_url = base_url if callable(base_url) else lambda: base_url
        self._api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_seconds = timeout
        self._props: _Props | None = None
        self._props_url: str | None = None
        self._last_models: tuple[str, ...] = ()

    @property
    def last_models(self) -> tuple[str, ...]:
        """The models llama.cpp served when it was last seen serving."""
        return self._last_models

    def forget(self) -> None:
        """Drop the cached props, so that the next observation reads them again."""
        self._props = None

    async def observe(self) -> Status:
        url = self._base_url()
        if url is None:
            return Status(
                state=LlamaCppState.UNREACHABLE,
                models=self._last_models,
                error="llama.cpp is not running",
            )
        url = url.rstrip("/")
        if url != self._props_url:
            self._props, self._props_url = None, url
        try:
            await self._check_health(url)
            # A local: another observation (the drain beside the monitoring loop) may forget
            # ``self._props`` while this one awaits /slots.
            props = self._props
            if props is None:
                props = self._props = await self._read_props(url)
                self._last_models = props.models
            idle, processing = await self._read_slots(url)
        except _Failure as failure:
            if failure.state is not LlamaCppState.SLOTS_DISABLED:
                self._props = None
            return Status(
                state=failure.state, models=self._last_models, error=_clip(failure.message)
            )
        models = props.models
        if idle + processing != props.total_slots:
            self._props = None  # a different slot count means a different server: re-read props
        return Status(
            state=LlamaCppState.OK,
            slots_idle=idle,
            slots_processing=processing,
            models=models,
        )

    async def _check_health(self, url: str) -> None:
        await self._get_json(url, "/health")

    async def _read_props(self, url: str) -> _Props:
        props = await self._get_json(url, "/props")
        if not isinstance(props, dict) or not isinstance(props.get("total_slots"), int):
            raise _Failure(LlamaCppState.ERROR, "GET /props did not report total_slots")
        names: list[Any] = [props.get("model_alias")]
        # /v1/models adds the ids clients may send as "model"; it is optional, older servers
        # and proxies in front of llama.cpp may not have it.
        status, body = await self._get(url, "/v1/models")
        if status == 200:
            listing = _loads_or_none(body)
            if isinstance(listing, dict) and isinstance(listing.get("data"), list):
                names += [item.get("id") for item in listing["data"] if isinstance(item, dict)]
        return _Props(total_slots=props["total_slots"], models=_model_names(names))

    async def _read_slots(self, url: str) -> tuple[int, int]:
        slots = await self._get_json(url, "/slots")
        if not isinstance(slots, list) or not all(
            isinstance(slot, dict) and isinstance(slot.get("is_processing"), bool) for slot in slots
        ):
            raise _Failure(LlamaCppState.ERROR, "GET /slots did not return a list of slots")
        processing = sum(1 for slot in slots if slot["is_processing"])
        return len(slots) - processing, processing

    async def _get_json(self, url: str, path: str) -> Any:
        status, body = await self._get(url, path)
        if status != 200:
            raise self._classify(path, status, body)
        parsed = _loads_or_none(body)
        if parsed is None:
            raise _Failure(LlamaCppState.ERROR, f"GET {path} did not return JSON")
        return parsed

    async def _get(self, url: str, path: str) -> tuple[int, bytes]:
        try:
            async with self._session.get(
                url + path, headers=self._headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            # Checked before ClientError: aiohttp's timeouts are both.
            raise _Failure(
                LlamaCppState.UNREACHABLE,
                f"llama.cpp at {url} did not answer GET {path} within {self._timeout_seconds:g}s",
            ) from None
        except aiohttp.ClientConnectorError as error:
            reason = _os_reason(error.os_error)
            raise _Failure(
                LlamaCppState.UNREACHABLE, f"cannot connect to llama.cpp at {url}: {reason}"
            ) from None
        except aiohttp.ClientConnectionError as error:
            raise _Failure(
                LlamaCppState.UNREACHABLE,
                f"llama.cpp at {url} dropped GET {path}: {error or type(error).__name__}",
            ) from None
        except aiohttp.ClientError as error:
            raise _Failure(
                LlamaCppState.ERROR, f"GET {path} failed: {error or type(error).__name__}"
            ) from None

    def _classify(self, path: str, status: int, body: bytes) -> _Failure:
        message = _error_message(body)
        if status in (401, 403):
            if self._api_key:
                advice = "llama.cpp rejected our API key: set --local-llamacpp-api-key to its key"
            else:
                advice = "llama.cpp requires an API key: set --local-llamacpp-api-key"
            return _Failure(LlamaCppState.UNAUTHORIZED, advice)
        if status == 503 and message == "Loading model":
            return _Failure(LlamaCppState.LOADING, "llama.cpp is loading the model")
        if status == 501 and path == "/slots":
            return _Failure(
                LlamaCppState.SLOTS_DISABLED,
                "llama.cpp's /slots endpoint is disabled (--no-slots); the agent needs it",
            )
        detail = f": {message}" if message else ""
        return _Failure(LlamaCppState.ERROR, f"GET {path} answered HTTP {status}{detail}")


def _loads_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_message(body: bytes) -> str | None:
    message = error_message(body)
    return None if message is None else _clip(message, 300)


def _model_names(candidates: list[Any]) -> tuple[str, ...]:
    names = [name[:_MAX_MODEL_NAME_CHARS] for name in candidates if isinstance(name, str) and name]
    return tuple(dict.fromkeys(names))[:_MAX_MODELS]


def _clip(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _os_reason(error: OSError) -> str:
    # asyncio's connect errors read "Connect call failed ('127.0.0.1', 8085)"; the errno is
    # what the operator needs.
    return os.strerror(error.errno) if error.errno else str(error)
