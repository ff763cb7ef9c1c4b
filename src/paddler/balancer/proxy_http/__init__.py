"""The proxy port's hand-written HTTP/1.1 server (``--proxy-server httptools``).

``asyncio.Protocol`` and ``httptools.HttpRequestParser``, split as uvicorn's ``httptools_impl``:
``connection`` (one client connection: parsing, pipelining, timers, handler tasks),
``request`` (a request as the proxy reads it), ``response`` (heads, whole answers and streams)
and ``server`` (listening, the cap, graceful shutdown). It runs the same proxy as aiohttp's
server does, through ``client_exchange``.

Why hand-written: aiohttp's server was the largest part of the balancer's floor left after the
hand-written upstream client. The bare hop with aiohttp's server and an httptools client took
269 k instructions a small request, the bare httptools hop (server and client) 82 k
(docs/benchmarks.md, proxy-floor); the balancer's own figures with each server are in
docs/benchmarks.md, proxy-server.
"""
