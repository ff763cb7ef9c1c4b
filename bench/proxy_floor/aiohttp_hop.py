"""The floor on aiohttp: a bare proxy hop (server and ClientSession), no Paddler logic, on uvloop.

Usage: ``python -m bench.proxy_floor.aiohttp_hop PORT UPSTREAM_PORT`` (a ``--prototype`` of
``python -m bench.profile_proxy``). A measurement, not product code: what aiohttp alone costs
per request and per chunk, under anything Paddler adds (issue 10).
"""

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
}


async def main(port, upstream_port):
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    fresh = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False
    )
    base = f"http://127.0.0.1:{upstream_port}"

    async def forward(request):
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        try:
            up = await session.request(
                request.method, base + request.raw_path, headers=headers, data=body or None
            )
        except aiohttp.ClientConnectionError:  # a pooled connection the server closed: once more
            up = await fresh.request(
                request.method, base + request.raw_path, headers=headers, data=body or None
            )
        if up.content_length and up.content.is_eof():
            r = web.Response(status=up.status, body=up.content.read_nowait())
            r.headers.update({k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await r.prepare(request)
            await r.write_eof()
            up.release()
            return r
        r = web.StreamResponse(status=up.status)
        r.headers.update({k: v for k, v in up.headers.items() if k.lower() not in HOP})
        if up.content_length is not None:
            r.content_length = up.content_length
        await r.prepare(request)
        while chunk := await up.content.readany():
            await r.write(chunk)
        await r.write_eof()
        up.close()
        return r

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
