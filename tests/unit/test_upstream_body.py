"""The hand-written upstream client's response body and request head, without sockets."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from paddler.balancer.upstream_http.failures import ReadTimeout
from paddler.balancer.upstream_http.pool import request_head
from paddler.balancer.upstream_http.response import HIGH_WATER, Body


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
