"""How an exchange with a llama.cpp server can fail, in the types the proxy already tells apart.

They subclass aiohttp's (and the built-in) exceptions that ``paddler.balancer.proxy.upstream`` catches
for its aiohttp client, so that deciding whose fault a failure is stays in one place whichever
client (``--upstream-client``) sent the request.
"""

from __future__ import annotations

import aiohttp


class ConnectFailed(Exception):
    """No connection to the llama.cpp server could be opened."""


class Disconnected(ConnectionResetError):
    """The connection failed before the response's head was whole. Before any byte of it, on a
    pooled connection, that is llama.cpp ending its keep-alive: the request is safe to send
    once more on a fresh connection (as aiohttp's client, this one does not tell those cases
    apart, and resends once either way)."""


class ReadTimeout(aiohttp.ServerTimeoutError):
    """No byte arrived for the read timeout while one was awaited (``--upstream-read-timeout``)."""


class BodyBroken(aiohttp.ClientPayloadError):
    """The response's body ended before its end: the connection dropped, or it was malformed."""
