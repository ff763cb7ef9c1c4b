"""The hand-written upstream client's response body and request head, without sockets."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from paddler.balancer.proxy.upstream_http.failures import ReadTimeout
from paddler.balancer.proxy.upstream_http.pool import request_head
from paddler.balancer.proxy.upstream_http.response import HIGH_WATER, Body, SinkFailed


def body() -> tuple[Body, list[None]]:
    resumed: list[None] = []
    return Body(lambda: resumed.append(None)), resumed


async def test_a_read_returns_every_byte_that_has_arrived_then_the_end() -> None:
    """readany joins what arrived unread, and gives b"" once the body ended."""
    content, _ = body()
    content.feed(b"data: 1\n\n")
    content.feed(b"data: 2\n\n")
    content.feed_eof()
    assert content.is_eof()
    assert await content.readany() == b"data: 1\n\ndata: 2\n\n"
    assert await content.readany() == b""
    assert content.total_bytes == 18


async def test_a_read_waits_for_the_next_bytes() -> None:
    """A read with nothing unread returns as soon as bytes arrive."""
    content, _ = body()
    reading = asyncio.ensure_future(content.readany())
    await asyncio.sleep(0)
    assert not reading.done()
    content.feed(b"x")
    assert await reading == b"x"


async def test_a_bounded_read_keeps_the_rest_for_the_next() -> None:
    """read(n) returns at most n bytes; the rest stays unread, in order."""
    content, _ = body()
    content.feed(b"abcdef")
    assert await content.read(4) == b"abcd"
    assert content.read_nowait() == b"ef"


async def test_an_exception_fails_the_pending_read_and_every_later_one() -> None:
    """Once the server is known gone or silent, reads fail even with bytes still unread."""
    content, _ = body()
    reading = asyncio.ensure_future(content.readany())
    await asyncio.sleep(0)
    content.set_exception(ReadTimeout("no byte for 1s"))
    with pytest.raises(ReadTimeout):
        await reading
    content.feed(b"late")
    with pytest.raises(ReadTimeout):
        await content.readany()


async def test_an_exception_after_the_whole_body_was_read_is_ignored() -> None:
    """A connection that closes after its response ended breaks nothing."""
    content, _ = body()
    content.feed(b"done")
    content.feed_eof()
    assert await content.readany() == b"done"
    content.set_exception(ReadTimeout("late"))
    assert content.exception() is None
    assert await content.readany() == b""


def test_a_body_past_the_high_water_asks_to_pause_and_resumes_once_read() -> None:
    """Past HIGH_WATER unread bytes the connection is told to stop reading; reading below it
    resumes it, once."""
    content, resumed = body()
    assert content.feed(b"x" * HIGH_WATER) is False
    assert content.feed(b"y") is True
    content.read_nowait(10)
    assert resumed == [None]
    content.read_nowait()
    assert resumed == [None]


async def test_a_piped_body_hands_each_piece_to_the_sink_until_the_end() -> None:
    """While the sink takes them, pieces go to it as they arrive, none is left unread, the
    reader is not woken for them, and the wait ends with the body."""
    content, _ = body()
    taken: list[bytes] = []
    assert content.pipe(lambda piece: taken.append(piece) is None)
    waiting = asyncio.ensure_future(content.piped())
    await asyncio.sleep(0)
    content.feed(b"data: 1\n\n")
    content.feed(b"data: 2\n\n")
    await asyncio.sleep(0)
    assert not waiting.done()
    assert taken == [b"data: 1\n\n", b"data: 2\n\n"]
    assert content.total_bytes == 18
    content.feed_eof()
    await waiting
    assert await content.readany() == b""


async def test_a_piece_the_sink_refuses_is_unread_in_order_and_the_pipe_stops() -> None:
    """A sink that refuses a piece (a client behind) stops the pipe: that piece and every later
    one are read as without it, in order."""
    content, _ = body()
    taken: list[bytes] = []

    def sink(piece: bytes) -> bool:
        if piece == b"2":
            return False
        taken.append(piece)
        return True

    assert content.pipe(sink)
    waiting = asyncio.ensure_future(content.piped())
    await asyncio.sleep(0)
    content.feed(b"1")
    content.feed(b"2")
    content.feed(b"3")
    await waiting
    assert taken == [b"1"]
    assert await content.readany() == b"23"
    assert content.total_bytes == 3


async def test_a_sink_that_raises_fails_the_wait_with_its_error() -> None:
    """The sink's error (the client gone) reaches the reader, not the connection feeding it."""
    content, _ = body()

    def sink(piece: bytes) -> bool:
        raise ConnectionResetError("the client closed the connection")

    assert content.pipe(sink)
    waiting = asyncio.ensure_future(content.piped())
    await asyncio.sleep(0)
    assert content.feed(b"x") is False
    with pytest.raises(SinkFailed) as failed:
        await waiting
    assert isinstance(failed.value.error, ConnectionResetError)


async def test_a_failing_body_fails_the_piped_wait() -> None:
    """The server gone or silent mid-pipe fails the wait as it fails a read."""
    content, _ = body()
    assert content.pipe(lambda piece: True)
    waiting = asyncio.ensure_future(content.piped())
    await asyncio.sleep(0)
    content.set_exception(ReadTimeout("no byte for 1s"))
    with pytest.raises(ReadTimeout):
        await waiting


def test_nothing_is_piped_while_something_is_unread_or_the_body_is_over() -> None:
    """Piping would put later pieces ahead of unread ones: refused, as after the end."""
    content, _ = body()
    content.feed(b"unread")
    assert not content.pipe(lambda piece: True)
    content.read_nowait()
    content.feed_eof()
    assert not content.pipe(lambda piece: True)


def test_the_request_head_frames_the_body_itself() -> None:
    """Content-Length is the body's own; Expect, Transfer-Encoding and the client's
    Content-Length are not forwarded; header bytes survive the round trip."""
    headers = CIMultiDict(
        [
            ("Host", "agent:8080"),
            ("Expect", "100-continue"),
            ("Content-Length", "999"),
            ("Transfer-Encoding", "chunked"),
            ("X-Name", "caf\udcc3\udca9"),
        ]
    )
    head = request_head("POST", "/completion?x=%20y", headers, 2)
    assert head == (
        b"POST /completion?x=%20y HTTP/1.1\r\n"
        b"Host: agent:8080\r\n"
        b"X-Name: caf\xc3\xa9\r\n"
        b"Content-Length: 2\r\n\r\n"
    )


def test_a_request_without_a_body_has_a_length_only_if_its_method_expects_one() -> None:
    """GET goes without Content-Length; an empty POST says 0."""
    assert b"Content-Length" not in request_head("GET", "/health", CIMultiDict(), 0)
    assert b"Content-Length: 0\r\n" in request_head("POST", "/tokenize", CIMultiDict(), 0)
