"""Answers on the proxy port: heads, whole answers in one write, and streams with backpressure.

A whole answer (``client_exchange.Answer``) goes out as one write, head and body together. A
stream's head waits for its first chunk, so that a small stream costs one write too; each chunk
is one write (chunked framing, unless the upstream gave a Content-Length), and a write that
fills the transport's buffer waits until the client has read enough (``Writer``).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from multidict import CIMultiDict

from paddler.balancer.proxy.client_exchange import Answer

_REASONS = {status.value: status.phrase for status in HTTPStatus}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def has_body(status: int, method: str) -> bool:
    """Whether an answer with ``status`` to ``method`` carries a body (RFC 9112 section 6.3)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def head(
    status: int, reason: str | None, headers: CIMultiDict[str], framing: str, keep_alive: bool
) -> bytes:
    """The status line and header block; ``framing``: the Content-Length or
    Transfer-Encoding line(s) the body needs, already ended by CRLF (or empty)."""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    end = "\r\n" if keep_alive else "Connection: close\r\n\r\n"
    reason = reason or _REASONS.get(status, "")
    return f"HTTP/1.1 {status} {reason}\r\n{fields}{framing}{end}".encode("latin-1")


def whole(answer: Answer, method: str, keep_alive: bool) -> bytes:
    """``answer`` as bytes: its head (with its Content-Length) and, unless it has none, its
    body."""
    status = answer.status
    length = (
        f"Content-Length: {len(answer.body)}\r\n"
        if status >= 200 and status not in (204, 304)
        else ""
    )
    start = head(status, answer.reason, answer.headers, length, keep_alive)
    return start + answer.body if has_body(status, method) else start


class Writer:
    """A connection's writing side: whether the transport may take more, and waiting until it
    may. ``lost``: the client is gone (every later write raises ``ConnectionResetError``)."""

    __slots__ = ("_drained", "lost", "paused")

    def __init__(self) -> None:
        self.paused = False
        self._drained: asyncio.Future[None] | None = None
        self.lost = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self) -> None:
        self.lost = True
        self._wake()

    async def drain(self) -> None:
        while self.paused and not self.lost:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.lost:
            raise ConnectionResetError("the client closed the connection")

    def _wake(self) -> None:
        waiter = self._drained
        if waiter is not None:
            self._drained = None
            if not waiter.done():
                waiter.set_result(None)


class Stream:
    """An answer relayed as it arrives (``client_exchange.ClientStream``)."""

    __slots__ = ("_body", "_chunked", "_head", "_transport", "_writer", "ended")

    def __init__(
        self,
        transport: asyncio.Transport,
        writer: Writer,
        head_bytes: bytes,
        body: bool,
        chunked: bool,
    ) -> None:
        self._transport = transport
        self._writer = writer
        self._head: bytes | None = head_bytes
        self._body = body
        self._chunked = chunked
        self.ended = False

    async def write(self, chunk: bytes) -> None:
        writer = self._writer
        if writer.paused and not writer.lost:
            await writer.drain()  # the client is behind: nothing more until it catches up
        self.write_now(chunk)
        if writer.paused or writer.lost:
            await writer.drain()

    def write_now(self, chunk: bytes) -> bool:
        writer = self._writer
        if writer.lost or self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if writer.paused:
            return False
        if not chunk or not self._body:
            return True
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk
        if self._head is not None:
            data = self._head + data
            self._head = None
        self._transport.write(data)
        return True

    async def write_eof(self) -> None:
        if self.ended:
            return
        if self._writer.lost:
            raise ConnectionResetError("the client closed the connection")
        data = b"0\r\n\r\n" if self._chunked and self._body else b""
        if self._head is not None:
            data = self._head + data
            self._head = None
        if data:
            self._transport.write(data)
        self.ended = True
        await self._writer.drain()

    def cut(self) -> None:
        if self._head is not None:  # nothing sent yet: the client must still see a failure
            self._transport.write(self._head)
            self._head = None
        self._transport.close()
