"""A hybrid floor: aiohttp's web server, and a small upstream client on asyncio.Protocol + httptools.

Usage: ``python -m bench.proxy_floor.aiohttp_httptools_hop PORT UPSTREAM_PORT`` (a
``--prototype`` of ``python -m bench.profile_proxy``). A measurement, not product code: how much
of the aiohttp hop's cost (``aiohttp_hop``) is its ClientSession, i.e. what replacing only the
balancer's upstream client could save while the server half stays aiohttp (issue 10).

The client: a pool of kept-alive connections, one response at a time each, parsed by
httptools.HttpResponseParser; the handler awaits the head, then relays body parts as they arrive
(a whole small answer as one ``web.Response``). Backpressure: the handler's ``await write`` is the
pace, the protocol pauses reading while more than 64 KiB waits.
"""

import asyncio
import collections
import sys

import httptools
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
    "host",
}
HOP_BYTES = {name.encode() for name in HOP}


class Upstream(asyncio.Protocol):
    def __init__(self, pool):
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.head = None  # future: (status, headers, length) once the head is parsed
        self.parts = collections.deque()
        self.buffered = 0
        self.waiter = None
        self.done = False
        self.paused = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
        if self.head is not None and not self.head.done():
            self.head.set_exception(ConnectionResetError())
        self._wake()

    def start(self):
        self.head = asyncio.get_running_loop().create_future()
        self.parts.clear()
        self.buffered = 0
        self.done = False

    def on_message_begin(self):
        self.headers = []
        self.length = None
        self.keep_alive = True

    def on_header(self, name, value):
        lower = name.lower()
        if lower == b"content-length":
            self.length = int(value)
        elif lower == b"content-type" and value.startswith(b"text/event-stream"):
            self.keep_alive = False
        if lower not in HOP_BYTES:
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        self.head.set_result((self.parser.get_status_code(), self.headers, self.length))

    def on_body(self, body):
        self.parts.append(body)
        self.buffered += len(body)
        if self.buffered > 65536 and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self):
        self.done = True
        self._wake()

    def _wake(self):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self):
        """The next body part, or b"" at the end; ConnectionResetError if cut off."""
        while not self.parts:
            if self.done:
                return b""
            if self.closed:
                raise ConnectionResetError()
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        part = self.parts.popleft()
        self.buffered -= len(part)
        if self.paused and self.buffered <= 65536:
            self.paused = False
            self.transport.resume_reading()
        return part

    def release(self):
        if self.done and self.keep_alive and not self.closed:
            self.pool.idle.append(self)
        else:
            self.transport.close()


class Pool:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle = []

    async def take(self, fresh):
        while self.idle and not fresh:
            upstream = self.idle.pop()
            if not upstream.closed and not upstream.transport.is_closing():
                return upstream, True
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        return upstream, False


async def main(port, upstream_port):
    pool = Pool("127.0.0.1", upstream_port)
    host = b"Host: 127.0.0.1:%d\r\n" % upstream_port

    async def forward(request):
        body = await request.read()
        head = [
            b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.raw_path.encode()),
            host,
        ]
        for k, v in request.raw_headers:
            if k.lower() not in HOP_BYTES:
                head.append(b"%s: %s\r\n" % (k, v))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        message = b"".join(head)
        for attempt in range(2):  # a pooled connection the server closed: once more, fresh
            upstream, pooled = await pool.take(fresh=attempt > 0)
            upstream.start()
            upstream.transport.write(message)
            try:
                status, headers, length = await upstream.head
                break
            except ConnectionResetError:
                if not pooled:
                    raise
        if length is not None and upstream.done:
            r = web.Response(status=status, body=b"".join(upstream.parts))
            r.headers.extend(headers)
            upstream.release()
            return r
        r = web.StreamResponse(status=status)
        r.headers.extend(headers)
        if length is not None:
            r.content_length = length
        await r.prepare(request)
        while part := await upstream.read():
            await r.write(part)
        await r.write_eof()
        upstream.release()
        return r

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
