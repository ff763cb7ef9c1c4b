"""The balancer's hand-written HTTP/1.1 client towards llama.cpp servers (``--upstream-client
httptools``, the default; ``aiohttp`` keeps aiohttp's ``ClientSession``).

Why hand-written: measured, aiohttp's client is more than half of what a bare aiohttp proxy hop
costs. ``python -m bench.profile_proxy instructions`` (callgrind, user-space instructions, which
repeat within 0.2 %) on ``bench/proxy_floor``: the hop with aiohttp's server and client, 582 k
instructions a small request and 45.2 k a relayed SSE chunk; the same server with a small client
on ``asyncio.Protocol`` and httptools' parser (``aiohttp_httptools_hop``), 269 k and 27.6 k: 54 %
and 39 % fewer. In Paddler, against ``--upstream-client aiohttp``: 835 k instead of 1,105 k
instructions a small request, 34.6 k instead of 51.4 k a chunk, 35.5 instead of 40.6 KiB per
open stream (docs/benchmarks.md, "The upstream client"). The client is small because it needs
little: one request at a time per connection, bodies read whole before they are sent, no
redirects, cookies, proxies, compression or auth of its own.

- ``connection``: one connection, its parser, the read timeout and backpressure;
- ``pool``: kept-alive connections per server, and the request's head;
- ``response``: a response's head and body, in the shape of aiohttp's that the proxy reads;
- ``failures``: the exceptions, as subclasses of those the proxy already tells apart.
"""
