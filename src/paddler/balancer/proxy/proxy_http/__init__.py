"""The proxy port's hand-written HTTP/1.1 server (``--proxy-server httptools``).

``asyncio.Protocol`` and ``httptools.HttpRequestParser``, split as uvicorn's ``httptools_impl``:
``connection`` (one client connection: parsing, pipelining, timers, handler tasks),
``request`` (a request as the proxy reads it), ``response`` (heads, whole answers and streams)
and ``server`` (listening, the cap, graceful shutdown). It runs the same proxy as aiohttp's
server does, through ``client_exchange``.

Why hand-written: aiohttp's server was the largest part of the balancer's floor left after the
hand-written upstream client (the bare hop with aiohttp's server and an httptools client took
269 k instructions a small request, the bare httptools hop 82 k). Through the balancer,
``python -m bench.profile_proxy instructions --contestants
paddler-aiohttp-server,paddler-httptools-server --what small,chunks`` counted 856 k instructions
per small request and 36.4 k per relayed chunk with aiohttp's server, 711 k and 27.1 k with
this one (17 % and 25 % fewer), and 31.3 KiB per open stream instead of 35.9
(docs/benchmarks.md, proxy-floor and proxy-server).
"""
