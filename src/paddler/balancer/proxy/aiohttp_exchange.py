"""The proxy port on aiohttp's web server (``--proxy-server aiohttp``): each request wrapped as a
``client_exchange.ClientRequest``, each ``Answer`` turned into a ``web.Response``.

Connections (head and keep-alive timeouts, the cap) are ``client_connections``' rules around
aiohttp's protocol; ``service.proxy_runner`` installs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from paddler.balancer.proxy.client_exchange import Answer, ClientRequest, ClientStream, RequestBody


class AiohttpRequest:
    """An aiohttp request, as the proxy reads it. ``response``: the stream opened on it, if any."""

    __slots__ = ("_request", "key_id", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.key_id: str | None = None
        self.response: web.StreamResponse | None = None

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def path(self) -> str:
        return self._request.path

    @property
    def raw_path(self) -> str:
        return self._request.raw_path

    @property
    def query(self) -> Mapping[str, str]:
        return self._request.query

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._request.headers

    @property
    def content_length(self) -> int | None:
        return self._request.content_length

    @property
    def content(self) -> RequestBody:
        return self._request.content

    async def stream(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        content_length: int | None,
    ) -> ClientStream:
        response = web.StreamResponse(status=status, reason=reason)
        if content_length is not None:
            response.content_length = content_length
        response.headers.update(headers)
        await response.prepare(self._request)
        self.response = response
        return _Stream(self._request, response)


class _Stream:
    __slots__ = ("_request", "_response")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._response = response

    async def write(self, chunk: bytes) -> None:
        await self._response.write(chunk)

    def write_now(self, chunk: bytes) -> bool:
        return False  # aiohttp writes and drains in one coroutine

    async def write_eof(self) -> None:
        await self._response.write_eof()

    def cut(self) -> None:
        if self._request.transport is not None:
            self._request.transport.close()


def response_of(answer: Answer) -> web.Response:
    response = web.Response(status=answer.status, reason=answer.reason, body=answer.body)
    response.headers.update(answer.headers)
    if answer.close:
        response.force_close()
    return response


Handle = Callable[[ClientRequest], Awaitable[Answer | None]]


def proxy_app(handle: Handle) -> web.Application:
    """An app that hands every request to ``handle`` (``ReverseProxy.handle``)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        exchange = AiohttpRequest(request)
        answer = await handle(exchange)
        if answer is None:
            assert exchange.response is not None, "no answer, and no stream either"
            return exchange.response
        return response_of(answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    return app
