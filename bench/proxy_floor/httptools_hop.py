"""The floor: one proxy hop on raw asyncio.Protocol + httptools on uvloop, no Paddler logic.

Usage: ``python -m bench.proxy_floor.httptools_hop PORT UPSTREAM_PORT`` (a ``--prototype`` of
``python -m bench.profile_proxy``; needs ``pip install httptools``). A measurement, not product
code: it tells what a hand-written HTTP layer could reach (issue 10).

Server side: httptools.HttpRequestParser per client connection, keep-alive, one request at a time.
Client side: a pool of kept-alive upstream connections, httptools.HttpResponseParser each; the
connection that replaces a stream's (llama.cpp closes it) opens at the stream's head, as Paddler's does.
The response head goes out with the first body bytes that arrived with it (one write for a
small answer); a chunked upstream body is re-chunked as it arrives; a Content-Length body is
relayed as is. Backpressure: a client that does not read pauses the upstream connection.
"""

import asyncio
import sys

import httptools
import uvloop

HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"content-length",
}


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the server; relays one response at a time to ``client``."""

    def __init__(self, pool):
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.client = None
        self.closed = False
        self.ready = asyncio.get_running_loop().create_future()

    # -- transport
    def connection_made(self, transport):
        self.transport = transport
        self.ready.set_result(None)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
        if self.client is not None:
            self.client.upstream_lost()
            self.client = None

    # -- parser callbacks
    def on_message_begin(self):
        self.headers = []
        self.chunked = False
        self.length = None
        self.keep_alive = True

    def on_header(self, name, value):
        lower = name.lower()
        if lower == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()
        elif lower == b"content-length":
            self.length = value
        elif lower == b"connection":
            self.keep_alive = b"close" not in value.lower()
        elif lower == b"content-type" and value.startswith(b"text/event-stream"):
            self.keep_alive = False  # llama.cpp closes the connection after a stream
        if lower not in HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self):
        status = self.parser.get_status_code()
        head = [b"HTTP/1.1 %d OK\r\n" % status, *self.headers]
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        elif self.length is not None:
            head.append(b"Content-Length: %s\r\n" % self.length)
        head.append(b"\r\n")
        self.client.start_response(b"".join(head), self.chunked)
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        if not self.keep_alive:
            # This connection carries no other request: its replacement opens now, after this
            # callback (the first chunk's write goes first), as Paddler's pool does.
            asyncio.get_running_loop().call_soon(self.pool.warm)

    def on_body(self, body):
        self.client.body(body)

    def on_message_complete(self):
        client, self.client = self.client, None
        client.end_response()
        if self.keep_alive and not self.closed:
            self.pool.give_back(self)
        else:
            self.transport.close()


class Pool:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle = []
        self.warming = None

    async def take(self):
        while self.idle:
            upstream = self.idle.pop()
            if not upstream.closed and not upstream.transport.is_closing():
                return upstream
        if self.warming is not None:
            warming, self.warming = self.warming, None
            return await warming
        return await self._open()

    async def _open(self):
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        return upstream

    def warm(self):
        """Open a connection ahead of the next request, unless one is idle or opening."""
        if self.idle or self.warming is not None:
            return
        self.warming = warming = asyncio.get_running_loop().create_task(self._open())

        def opened(task):
            if self.warming is task:
                self.warming = None
                if not task.cancelled() and task.exception() is None:
                    self.idle.append(task.result())

        warming.add_done_callback(opened)

    def give_back(self, upstream):
        self.idle.append(upstream)


class Client(asyncio.Protocol):
    """One client connection: parses requests, forwards each, relays its answer."""

    def __init__(self, pool):
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.upstream = None
        self.out = []  # the head, held until the first body bytes
        self.chunked = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.close()
        except httptools.HttpParserError:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()  # the server must see the client leave
            self.upstream = None

    def pause_writing(self):
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self):
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- request parser callbacks
    def on_message_begin(self):
        self.url = b""
        self.head = []
        self.body_parts = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        if name.lower() not in HOP:
            self.head.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body):
        self.body_parts.append(body)

    def on_message_complete(self):
        self.transport.pause_reading()  # one request at a time
        body = b"".join(self.body_parts)
        method = self.parser.get_method()
        request = b"".join(
            [
                b"%s %s HTTP/1.1\r\n" % (method, self.url),
                *self.head,
                b"Content-Length: %d\r\n\r\n" % len(body) if body or method == b"POST" else b"\r\n",
                body,
            ]
        )
        asyncio.get_running_loop().create_task(self.send(request))

    async def send(self, request):
        for _ in range(2):  # a pooled connection the server has just closed: once more, fresh
            upstream = await self.pool.take()
            await upstream.ready
            if upstream.closed:
                continue
            upstream.client = self
            self.upstream = upstream
            upstream.transport.write(request)
            return
        self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    # -- from the upstream
    def start_response(self, head, chunked):
        self.chunked = chunked
        self.out = [head]

    def body(self, data):
        if self.chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)
        self.flush()

    def flush(self):
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []

    def end_response(self):
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self.upstream = None
        self.transport.resume_reading()

    def upstream_lost(self):
        # The server closed mid-answer: cut the client off, so that it sees a truncation.
        self.upstream = None
        if self.out and self.out[0].startswith(b"HTTP/1.1"):
            self.flush()
        self.transport.close()


async def main(port, upstream_port):
    pool = Pool("127.0.0.1", upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(pool), "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
