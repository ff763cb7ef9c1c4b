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

A server that stops making progress (frozen, swapping, deadlocked) is caught two ways:

- its agent reports llama.cpp ``unreachable`` and the pool aborts the request's guard (see
  ``slot_guard``): a request still waiting for the response headers fails at once with
  ``UpstreamBroken`` (nothing reached the client, so the caller tries another agent), and a
  response being relayed fails its next read with ``Interrupted``, which ends a stream with the
  SSE error event. Both cost nothing per chunk: a deadline that the abort moves to now, and an
  exception set on the response's stream;
- as a backstop, ``read_timeout`` (``--upstream-read-timeout``): an idle timeout on each read of
  the socket, from the end of the request body to the response headers and then between chunks,
  restarted on every packet and stopped while the client's own slowness pauses reading
  (``upstream_http.connection``; with ``--upstream-client aiohttp``, aiohttp 3.14's
  ``sock_read``). A timeout is the server's fault, never the pooled
  connection's: it is not resent on a fresh connection, where it would wait as long again.
  Sending the body is not bounded by it: a frozen server whose socket buffer is full blocks that
  write until its agent reports it.

Two clients send the requests (``--upstream-client``): the hand-written ``upstream_http`` (the
default, for what it saves: see its docstring) and aiohttp's ``ClientSession``. Both keep every
promise above; their responses are read alike (``upstream_http.response.UpstreamResponse``).
``fetch`` (the balancer's own checks of a server) always uses aiohttp.

Keys: when the balancer checks client keys, or has a key of the llama.cpp servers' own
(``--llamacpp-api-key``), the client's ``Authorization`` and ``X-Api-Key`` never reach llama.cpp;
the balancer's key, if any, goes instead as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import aiohttp.payload
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from paddler.balancer.api_error import stream_interrupted
from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.proxy.client_exchange import Answer, ClientRequest, ClientStream
from paddler.balancer.proxy.upstream_http.failures import ConnectFailed as ConnectFailed
from paddler.balancer.proxy.upstream_http.pool import ConnectionPool, request_head
from paddler.balancer.proxy.upstream_http.response import Body, SinkFailed, UpstreamResponse
from paddler.config import UPSTREAM_CLIENTS
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


CLIENT_KEY_HEADERS = ("Authorization", "X-Api-Key")

_WHOLE_BODY_BYTES = 1024 * 1024
"""Bodies up to this size are handed to the transport in one piece (aiohttp's own limit)."""

_PIECE_BYTES = 256 * 1024


class UpstreamBroken(Exception):
    """The server accepted the request but failed before or while answering."""


class Interrupted(aiohttp.ClientConnectionError):
    """A response ended from outside: its server is known to be gone (see ``interrupt``)."""


def interrupt(response: UpstreamResponse, reason: str) -> None:
    """Make the pending and every later read of ``response`` fail with ``Interrupted(reason)``,
    and drop its connection."""
    response.content.set_exception(Interrupted(reason))
    response.close()


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The end-to-end headers: hop-by-hop ones, and any the Connection header names, dropped.

    A copy with the few hop-by-hop names taken out, in multidict's C code: rebuilding the
    headers pair by pair in Python, twice a request, cost 3% of a small request's
    instructions."""
    forwarded = headers.copy()
    for name in HOP_BY_HOP:
        if name in forwarded:
            del forwarded[name]
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            forwarded.popall(token.strip(), None)
    return forwarded


class Upstream:
    """The balancer's HTTP client towards llama.cpp servers; one per process."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive_timeout: float,
        rewrite_host_header: bool,
        read_timeout: float | None = None,
        llamacpp_api_key: str | None = None,
        drop_client_keys: bool = False,
        client: str = "httptools",
    ) -> None:
        """``client``: which sends the requests to relay, one of ``UPSTREAM_CLIENTS``."""
        if client not in UPSTREAM_CLIENTS:
            raise ValueError(f"--upstream-client must be one of {', '.join(UPSTREAM_CLIENTS)}")
        self._client = client
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._llamacpp_api_key = llamacpp_api_key
        self._drop_client_keys = drop_client_keys or llamacpp_api_key is not None
        self._keepalive_timeout = keepalive_timeout
        self._rewrite_host_header = rewrite_host_header
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._connections: ConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Upstream:
        self._loop = asyncio.get_running_loop()
        if self._client == "httptools":
            self._connections = ConnectionPool(
                connect_timeout=self._connect_timeout,
                keepalive_timeout=self._keepalive_timeout,
                read_timeout=self.read_timeout,
            )
        else:
            self._pooled = self._session(
                aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_timeout)
            )
        self._fresh = self._session(aiohttp.TCPConnector(limit=0, force_close=True))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connections is not None:
            self._connections.close()
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()

    def _session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            # Per phase, never in total: a stream may rightly run for many minutes.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self.read_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def send(
        self,
        agent: AgentController,
        request: ClientRequest,
        body: bytes,
        extra_headers: Mapping[str, str] | None = None,
        guard: SlotGuard | None = None,
    ) -> UpstreamResponse:
        """Send the client's request to ``agent``; return once the response headers arrived.

        ``extra_headers`` (trace context) replace the client's headers of the same name.
        Aborting ``guard`` meanwhile ends the wait with ``UpstreamBroken`` and its reason.
        """
        assert self._fresh is not None, "use as a context manager"
        headers = end_to_end(request.headers)
        if self._rewrite_host_header:
            headers["Host"] = agent.address.authority
        if self._drop_client_keys:
            for name in CLIENT_KEY_HEADERS:
                headers.popall(name, None)
        if self._llamacpp_api_key is not None:
            headers["Authorization"] = f"Bearer {self._llamacpp_api_key}"
        if extra_headers:
            headers.update(extra_headers)
        # An abort cancels the wait, and the cancellation it made is told from any other as
        # asyncio.timeout tells its own: by the task's count of cancellation requests. (Not
        # asyncio.timeout itself: entering it looks the task up without the loop, which is a
        # getpid system call per request in Python 3.11.)
        task = asyncio.current_task(self._loop)
        assert task is not None, "send runs in a task"
        cancelling = task.cancelling()
        cancelled_by_abort = False

        def cancel(_reason: str) -> None:
            nonlocal cancelled_by_abort
            if not cancelled_by_abort:
                cancelled_by_abort = True
                task.cancel()

        if guard is not None:
            guard.on_abort(cancel)
        try:
            return await self._send(agent, request.method, request.raw_path, headers, body)
        except aiohttp.ServerTimeoutError as error:
            raise UpstreamBroken(self._silent(agent)) from error
        except asyncio.CancelledError:
            if guard is not None and cancelled_by_abort and task.uncancel() <= cancelling:
                raise UpstreamBroken(guard.aborted or f"{agent.name} was aborted") from None
            raise
        finally:
            if guard is not None:
                guard.on_abort(None)  # an abort from now on is the relay's to hear

    async def _send(
        self,
        agent: AgentController,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> UpstreamResponse:
        try:
            return await self._request(agent, method, target, headers, body, fresh=False)
        except (ConnectFailed, aiohttp.ServerTimeoutError):
            raise
        except (aiohttp.ClientConnectionError, ConnectionResetError) as first:
            log.debug(
                "pooled connection to %s failed (%r); resending on a fresh one", agent.name, first
            )
        try:
            return await self._request(agent, method, target, headers, body, fresh=True)
        except aiohttp.ServerTimeoutError:
            raise
        except (aiohttp.ClientConnectionError, ConnectionResetError) as second:
            raise UpstreamBroken(f"{agent.name} closed the connection: {second!r}") from second

    def _silent(self, agent: AgentController) -> str:
        return (
            f"{agent.name} sent no response within {self.read_timeout:g}s (--upstream-read-timeout)"
        )

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

    def _request(
        self,
        agent: AgentController,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        fresh: bool,
    ) -> Awaitable[UpstreamResponse]:
        """One attempt, on a pooled connection or (``fresh``) on one opened for it alone. Not
        a coroutine itself with the default client: it returns the pool's awaitable."""
        if self._connections is not None:
            if "Host" not in headers:
                headers["Host"] = agent.address.authority
            head = request_head(method, target, headers, len(body))
            return self._connections.exchange(
                agent.address, head, body, head_only=method == "HEAD", fresh=fresh
            )
        # encoded=True: the path and query go out byte for byte as the client sent them.
        url = URL(agent.url + target, encoded=True)
        return self._aiohttp_request(url, method, headers, body, fresh)

    async def _aiohttp_request(
        self, url: URL, method: str, headers: CIMultiDict[str], body: bytes, fresh: bool
    ) -> UpstreamResponse:
        session = self._fresh if fresh else self._pooled
        assert session is not None
        try:
            return await session.request(
                method, url, headers=headers, data=_payload(body), allow_redirects=False
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise ConnectFailed(str(error) or repr(error)) from error


def _payload(body: bytes) -> bytes | _Pieces | None:
    if len(body) > _WHOLE_BODY_BYTES:
        return _Pieces(body)
    return body or None


class _Pieces(aiohttp.payload.Payload):
    """A large body written in pieces, between which other requests' chunks flow.

    aiohttp would hand raw bytes to the transport at once (and warns that it may block), and its
    ``BytesIO`` payload copies the whole body first: a 30 MB copy holds the loop 15-20 ms here.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self._size = len(body)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        view = memoryview(self._value)
        for start in range(0, len(view), _PIECE_BYTES):
            await writer.write(view[start : start + _PIECE_BYTES])
            await asyncio.sleep(0)


def is_event_stream(response: UpstreamResponse) -> bool:
    return response.content_type == "text/event-stream"


@dataclass
class Relayed:
    """How relaying ended. ``answer``: the whole answer to send, or None if it was streamed."""

    answer: Answer | None
    failure: str | None = None
    client_gone: bool = False


async def relay(
    request: ClientRequest,
    upstream: UpstreamResponse,
    *,
    extra_headers: Mapping[str, str] | None = None,
    on_first_chunk: Callable[[], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
    read_timeout: float | None = None,
) -> Relayed:
    """Copy the upstream response to the client as it arrives, never buffering it whole.

    An answer that has arrived whole with its head (a non-streamed completion, an embedding, a
    small error: the body lies complete in the response's buffer) goes out in one write, head
    and body together, instead of a write for the head and another for the body. On loopback a
    write costs about 25 µs of the balancer's CPU, the kernel's delivery to the reader included:
    a tenth of a small request.

    If the server fails mid-answer (``read_timeout``: the upstream's, to name it when it
    passes), an event stream gets a clean end with an error event and any other body is cut
    off, so that the client sees it incomplete.
    """
    whole = _arrived_whole(request, upstream)
    headers = end_to_end(upstream.headers)
    if extra_headers:
        headers.update(extra_headers)
    finished = False
    if whole is not None:
        if on_first_chunk is not None:
            on_first_chunk()
        if on_chunk is not None:
            on_chunk(whole)
        # The whole body has arrived: the connection may carry another request (but not after
        # an event stream; see below).
        if is_event_stream(upstream):
            upstream.close()
        else:
            upstream.release()
        return Relayed(Answer(upstream.status, whole, headers, upstream.reason))
    outcome = Relayed(None)
    content = upstream.content
    # The hand-written client's body can hand each chunk to the client as it arrives
    # (``Body.pipe``); aiohttp's is read chunk by chunk.
    pipeable = content if isinstance(content, Body) else None
    try:
        response = await request.stream(
            upstream.status, upstream.reason, headers, upstream.content_length
        )
        write_now = response.write_now
        if on_chunk is None:
            sink = write_now
        else:
            feed_tail = on_chunk

            def sink(chunk: bytes) -> bool:
                if not write_now(chunk):
                    return False  # read again by the loop below, and fed to the tail then
                feed_tail(chunk)
                return True

        while True:
            try:
                chunk = await content.readany()
            except _UPSTREAM_FAILED as error:
                await _fail_mid_response(outcome, response, upstream, error, read_timeout)
                return outcome
            if not chunk:
                break
            if on_first_chunk is not None:
                on_first_chunk()
                on_first_chunk = None
            if on_chunk is not None:
                on_chunk(chunk)
            # Without a coroutine while the client keeps up: a chunk is a hot path. (One chunk
            # more may be read before waiting on a client that fell behind with this one.)
            if not write_now(chunk):
                await response.write(chunk)
            elif pipeable is not None and pipeable.pipe(sink):
                # The client keeps up: what arrives from now on goes from the upstream
                # connection's data_received straight to it, and this task waits for the
                # end, or for the client to fall behind (then the loop reads on).
                try:
                    await pipeable.piped()
                except SinkFailed as failed:
                    raise failed.error from None  # the client's side: ConnectionResetError
                except _UPSTREAM_FAILED as error:
                    await _fail_mid_response(outcome, response, upstream, error, read_timeout)
                    return outcome
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


def _arrived_whole(request: ClientRequest, upstream: UpstreamResponse) -> bytes | None:
    """The whole body, if it arrived with the head and is not empty; None otherwise: a stream,
    a body still on its way, or an answer without a body (to a HEAD, a 1xx, 204 or 304), whose
    head a ``Response`` would rewrite."""
    content = upstream.content
    if (
        not upstream.content_length
        or request.method == "HEAD"
        or upstream.status < 200
        or upstream.status in (204, 304)
        or not content.is_eof()  # aiohttp ends a body at its Content-Length
        or content.exception() is not None
    ):
        return None
    return content.read_nowait()


_UPSTREAM_FAILED = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError)
"""What reading an upstream body raises when the server fails mid-response."""


async def _fail_mid_response(
    outcome: Relayed,
    response: ClientStream,
    upstream: UpstreamResponse,
    error: BaseException,
    read_timeout: float | None,
) -> None:
    cause = _mid_response_cause(error, read_timeout)
    outcome.failure = f"the server failed mid-response: {cause}"
    await _end_broken_stream(response, is_event_stream(upstream), cause)


def _mid_response_cause(error: BaseException, read_timeout: float | None) -> str:
    if isinstance(error, Interrupted):
        return str(error)
    if isinstance(error, aiohttp.ServerTimeoutError) and read_timeout is not None:
        return f"no byte for {read_timeout:g}s (--upstream-read-timeout)"
    return repr(error)


async def _end_broken_stream(response: ClientStream, streaming: bool, cause: str) -> None:
    if streaming:
        # The client gets a well-formed end: an error event, as llama.cpp itself sends after the
        # first chunk, then the end of the chunked body.
        try:
            await response.write(stream_interrupted(cause).sse_event())
            await response.write_eof()
        except ConnectionResetError:
            pass
        return
    # Anything else must not look complete: cut the connection so the client sees a truncation.
    response.cut()


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

    def answer(self, extra_headers: Mapping[str, str] | None = None) -> Answer:
        headers = self.headers.copy()
        if extra_headers:
            headers.update(extra_headers)
        return Answer(self.status, self.body, headers, self.reason)


HELD_ANSWER_LIMIT = 64 * 1024
"""Largest answer kept to replay; llama.cpp's error bodies are a few hundred bytes."""


async def hold(
    response: UpstreamResponse,
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
        agent_name, response.status, response.reason, end_to_end(response.headers), body
    )
    description = f"answered {response.status}: {answer.message}"
    return (answer if complete else None), description
