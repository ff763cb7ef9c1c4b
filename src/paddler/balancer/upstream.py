"""Sending a request to a llama.cpp server and relaying its answer, chunk by chunk.

Connection reuse: llama.cpp closes an idle keep-alive connection after 5 s and after 100 requests.
A pooled connection that llama.cpp has just closed fails on first use ("Cannot write to closing
transport", a reset, or a disconnect before any response byte). Two measures keep that from ever
reaching a client:

- the pool forgets idle connections sooner than llama.cpp does (``upstream_keepalive_timeout``),
  and never keeps one that carried an event stream: llama.cpp closes those after the stream;
- a request that fails that way before any response arrived is sent once more on a connection
  that is opened for it alone. Nothing of the first attempt reached llama.cpp's handler (it
  closed the connection before reading it), so resending is safe.

A failure to *open* a connection is the server's fault, not the pool's: it surfaces as
``ConnectFailed`` and the caller tries another agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from paddler.balancer.agent_controller import AgentController
from paddler.balancer.api_error import stream_interrupted
from paddler.llamacpp_error import error_message

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1, plus the framing headers that each side of the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class ConnectFailed(Exception):
    """No connection to the llama.cpp server could be opened."""


class UpstreamBroken(Exception):
    """The server accepted the request but failed before or while answering."""


def _forwardable(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The end-to-end headers: hop-by-hop ones, and any the Connection header names, dropped."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    )


class Upstream:
    """The balancer's HTTP client towards llama.cpp servers; one per process."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive_timeout: float,
        rewrite_host_header: bool,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._keepalive_timeout = keepalive_timeout
        self._rewrite_host_header = rewrite_host_header
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Upstream:
        self._pooled = self._session(
            aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_timeout)
        )
        self._fresh = self._session(aiohttp.TCPConnector(limit=0, force_close=True))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()

    def _session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            # Per phase, never in total: a stream may rightly run for many minutes.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def send(
        self,
        agent: AgentController,
        request: web.Request,
        body: bytes,
        extra_headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the client's request to ``agent``; return once the response headers arrived.

        ``extra_headers`` (trace context) replace the client's headers of the same name.
        """
        assert self._pooled is not None and self._fresh is not None, "use as a context manager"
        # encoded=True: the path and query go out byte for byte as the client sent them.
        url = URL(agent.url + request.raw_path, encoded=True)
        headers = _forwardable(request.headers)
        if self._rewrite_host_header:
            headers["Host"] = agent.address.authority
        if extra_headers:
            headers.update(extra_headers)
        try:
            return await self._request(self._pooled, request.method, url, headers, body)
        except ConnectFailed:
            raise
        except (aiohttp.ClientConnectionError, ConnectionResetError) as first:
            log.debug(
                "pooled connection to %s failed (%r); resending on a fresh one", agent.name, first
            )
        try:
            return await self._request(self._fresh, request.method, url, headers, body)
        except (aiohttp.ClientConnectionError, ConnectionResetError) as second:
            raise UpstreamBroken(f"{agent.name} closed the connection: {second!r}") from second

    async def fetch(
        self, url: str, headers: Mapping[str, str], *, timeout: float, limit: int
    ) -> tuple[int, bytes]:
        """GET ``url`` for the balancer itself (checking a server, not relaying a client).

        Returns the status and the body. The whole exchange takes at most ``timeout`` seconds
        (raises ``TimeoutError``); a body beyond ``limit`` bytes raises ``ValueError``;
        ``aiohttp.ClientError`` and ``OSError`` pass through. The connection is not pooled.
        """
        assert self._fresh is not None, "use as a context manager"
        async with asyncio.timeout(timeout):
            async with self._fresh.get(url, headers=headers, allow_redirects=False) as response:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise ValueError(f"its answer is larger than {limit} bytes")
                return response.status, bytes(body)

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> aiohttp.ClientResponse:
        try:
            return await session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise ConnectFailed(str(error) or repr(error)) from error


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


@dataclass
class Relayed:
    """How relaying ended. ``response`` is always the one to return from the handler."""

    response: web.StreamResponse
    failure: str | None = None
    client_gone: bool = False


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str] | None = None,
    on_first_chunk: Callable[[], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> Relayed:
    """Copy the upstream response to the client as it arrives, never buffering it whole.

    If the server fails mid-answer, an event stream gets a clean end with an error event and
    any other body is cut off, so that the client sees it incomplete.
    """
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.update(_forwardable(upstream.headers))
    if extra_headers:
        response.headers.update(extra_headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    outcome = Relayed(response)
    finished = False
    try:
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as error:
                outcome.failure = f"the server failed mid-response: {error!r}"
                await _end_broken_stream(request, response, is_event_stream(upstream), error)
                return outcome
            if not chunk:
                break
            if on_first_chunk is not None:
                on_first_chunk()
                on_first_chunk = None
            if on_chunk is not None:
                on_chunk(chunk)
            await response.write(chunk)
        await response.write_eof()
        finished = True
    except ConnectionResetError:
        outcome.client_gone = True
    finally:
        if finished and not is_event_stream(upstream):
            upstream.release()
        else:
            # Closing, not releasing. After a failure, a cancellation or a client that left,
            # llama.cpp must see the connection drop to stop generating. After an event stream, llama.cpp closes
            # the connection itself (whatever its Keep-Alive header says): pooling it would only
            # make the next request fail on it first.
            upstream.close()
    return outcome


async def _end_broken_stream(
    request: web.Request, response: web.StreamResponse, streaming: bool, error: BaseException
) -> None:
    if streaming:
        # The client gets a well-formed end: an error event, as llama.cpp itself sends after the
        # first chunk, then the end of the chunked body.
        try:
            await response.write(stream_interrupted(repr(error)).sse_event())
            await response.write_eof()
        except ConnectionResetError:
            pass
        return
    # Anything else must not look complete: cut the connection so the client sees a truncation.
    if request.transport is not None:
        request.transport.close()


@dataclass(frozen=True)
class HeldAnswer:
    """A server's answer read whole (an error: small), to give to the client later, unchanged."""

    agent_name: str
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes

    @property
    def message(self) -> str:
        """llama.cpp's ``error.message``, or else the start of the body."""
        message = error_message(self.body)
        return message if message is not None else self.body[:300].decode("utf-8", "replace")

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        response = web.Response(status=self.status, reason=self.reason, body=self.body)
        response.headers.update(self.headers)
        if extra_headers:
            response.headers.update(extra_headers)
        return response


HELD_ANSWER_LIMIT = 64 * 1024
"""Largest answer kept to replay; llama.cpp's error bodies are a few hundred bytes."""


async def hold(
    response: aiohttp.ClientResponse,
    agent_name: str,
    *,
    limit: int = HELD_ANSWER_LIMIT,
    timeout: float = 2.0,
) -> tuple[HeldAnswer | None, str]:
    """Read an error answer whole and close it: the answer (None if it was too large, too slow
    or broken) and a description of it for logs and for the client's final error."""
    chunks: list[bytes] = []
    size = 0
    complete = False
    try:
        async with asyncio.timeout(timeout):
            while size <= limit:
                chunk = await response.content.read(limit + 1 - size)
                if not chunk:
                    complete = True
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    finally:
        response.close()
    body = b"".join(chunks)
    answer = HeldAnswer(
        agent_name, response.status, response.reason, _forwardable(response.headers), body
    )
    description = f"answered {response.status}: {answer.message}"
    return (answer if complete else None), description
