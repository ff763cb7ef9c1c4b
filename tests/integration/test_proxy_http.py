"""The hand-written proxy server's own promises (``--proxy-server httptools``), beyond those it
shares with aiohttp's (``test_proxy_servers``): a malformed request gets 400 in llama.cpp's
shape with a log line, after the answers to the requests before it; a refused body is not taken
for the next request."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from tests.integration.test_proxy_servers import connected, post, proxy, read_response
from tests.support.logs import watching

pytestmark = pytest.mark.both_event_loops


async def test_a_malformed_request_gets_400_in_the_openai_shape_and_a_log_line(
    session: aiohttp.ClientSession,
) -> None:
    """Garbage instead of a request line is answered 400 with an error body, logged, and the
    connection closed."""
    async with proxy(session, "httptools") as running, connected(running) as (reader, writer):
        with watching("paddler.balancer.proxy.proxy_http.connection") as log:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            status, headers, body = await read_response(reader)
            await log.wait_for(logging.INFO, containing="malformed request")
    assert status.split()[1] == "400"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"


async def test_a_malformed_request_after_a_good_one_is_answered_after_it(
    session: aiohttp.ClientSession,
) -> None:
    """A good request and garbage in one write: the good one gets its answer, then the 400."""
    async with proxy(session, "httptools") as running, connected(running) as (reader, writer):
        writer.write(post("/tokenize", b"{}") + b"\x00\x01 nonsense\r\n\r\n")
        first, _, body = await read_response(reader)
        second, _, _ = await read_response(reader)
    assert first == "HTTP/1.1 200 OK"
    assert json.loads(body)["body"] == "{}"
    assert second.split()[1] == "400"


async def test_a_body_refused_before_it_was_read_is_never_taken_for_a_request(
    session: aiohttp.ClientSession,
) -> None:
    """A body past --max-request-body-size gets 413: the requests written inside it are not
    served, and the connection's next request is."""
    async with (
        proxy(session, "httptools", max_request_body_size=1000) as running,
        connected(running) as (reader, writer),
    ):
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: balancer\r\n\r\n"
        writer.write(post("/tokenize", smuggled * 40))
        status, _, _ = await read_response(reader)
        assert status.split()[1] == "413"
        writer.write(b"GET /next HTTP/1.1\r\nHost: balancer\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["path"] == "/next"
