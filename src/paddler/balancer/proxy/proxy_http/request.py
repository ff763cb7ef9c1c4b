"""One request on the proxy port, as ``client_exchange.ClientRequest``: its head, parsed by
httptools, and its body as it arrives (``upstream_http.response.Body``: the connection stops
reading past ``HIGH_WATER`` unread bytes, so that a body costs the balancer what the proxy has
taken of it, not what the client has sent)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from paddler.balancer.proxy.client_exchange import ClientStream
from paddler.balancer.proxy.upstream_http.response import Body

if TYPE_CHECKING:
    from paddler.balancer.proxy.proxy_http.connection import Connection


_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
"""Every query-less request's query (read-only): nothing parsed, nothing allocated."""


class Request:
    """The head and body of one request; ``stream`` answers it through its connection."""

    __slots__ = (
        "_connection",
        "_query",
        "_query_string",
        "content",
        "content_length",
        "expects_continue",
        "headers",
        "keep_alive",
        "key_id",
        "method",
        "path",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        connection: Connection,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        version: str,
        keep_alive: bool,
        body: Body,
    ) -> None:
        self._connection = connection
        self.method = method
        self.raw_path = target
        path, _, self._query_string = target.partition("?")
        if not path.startswith("/"):  # absolute form: http://host/path
            after_scheme = path.partition("//")[2]
            path = "/" + after_scheme.partition("/")[2]
        self.path = unquote(path) if "%" in path else path
        self._query: MultiDictProxy[str] | None = None
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.version = version
        self.keep_alive = keep_alive
        self.expects_continue = (
            version == "1.1" and headers.get("Expect", "").lower() == "100-continue"
        )
        self.content = body
        self.key_id: str | None = None

    @property
    def query(self) -> Mapping[str, str]:
        """Parsed on first use: only requests that name no model in a JSON body need it."""
        if self._query is None:
            if not self._query_string:
                return _NO_QUERY
            pairs = parse_qsl(self._query_string, keep_blank_values=True)
            self._query = MultiDictProxy(MultiDict(pairs))
        return self._query

    async def stream(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        content_length: int | None,
    ) -> ClientStream:
        return self._connection.stream(self, status, reason, headers, content_length)
