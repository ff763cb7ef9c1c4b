"""The seam between the proxy's logic and the HTTP server of the proxy port (``--proxy-server``).

``reverse_proxy`` and ``upstream.relay`` read a client's request and answer it through these
types alone, so that aiohttp's server (``aiohttp_exchange``) and the hand-written one
(``proxy_http``) run the same proxy: the same routes, client keys, attempts, verdicts, errors,
traits and observers. A server turns each request into a ``ClientRequest``; the proxy returns
an ``Answer`` (a whole answer, which the server sends in one write) or, for an answer it relays
as it arrives, opens a ``ClientStream`` on the request and returns None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from paddler.balancer.api_error import ApiError

JSON = "application/json; charset=utf-8"


class RequestBody(Protocol):
    """The request's body as it arrives (aiohttp's ``StreamReader`` has these two)."""

    def is_eof(self) -> bool:
        """Whether the whole body has arrived (some of it may be unread)."""
        ...

    async def readany(self) -> bytes:
        """What has arrived and is unread, waiting for some if nothing has; b"" at the end."""
        ...


class ClientStream(Protocol):
    """An answer whose head has gone out and whose body follows as it arrives."""

    async def write(self, chunk: bytes) -> None:
        """Send ``chunk``; waits while the client is behind (backpressure). Raises
        ``ConnectionResetError`` once the client is gone."""
        ...

    def write_now(self, chunk: bytes) -> bool:
        """Send ``chunk`` if that needs no wait, and say whether it was sent: False means
        ``write`` it (the client is behind, or this server cannot tell). The relay's path for
        each chunk, without a coroutine. Raises ``ConnectionResetError`` once the client is
        gone."""
        ...

    async def write_eof(self) -> None:
        """End the body (the last chunk of a chunked one)."""
        ...

    def cut(self) -> None:
        """Close the connection without ending the body, so that the client sees it cut off."""
        ...


class ClientRequest(Protocol):
    """What the proxy reads of one request on the proxy port."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str:
        """Percent-decoded, without the query."""
        ...

    @property
    def raw_path(self) -> str:
        """The request target as the client sent it, query included."""
        ...

    @property
    def query(self) -> Mapping[str, str]: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> RequestBody: ...

    key_id: str | None
    """The id of the client key the request presented (``client_auth``), once checked."""

    async def stream(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        content_length: int | None,
    ) -> ClientStream:
        """Send the head of an answer whose body follows (chunked, without ``content_length``)."""
        ...


@dataclass(slots=True)
class Answer:
    """A whole answer. ``close``: the connection closes after it (the rest of a request's body
    may never come)."""

    status: int
    body: bytes = b""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    reason: str | None = None
    close: bool = False


def json_answer(
    value: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Answer:
    answer = Answer(status, json.dumps(value).encode(), CIMultiDict({"Content-Type": JSON}))
    if headers:
        answer.headers.update(headers)
    return answer


def error_answer(error: ApiError) -> Answer:
    """``error`` in llama.cpp's shape, with its ``Retry-After`` if it has one."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return json_answer(error.body(), error.status, headers)
