"""Nothing a client or an agent sends can forge a line in the balancer's text log."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp

from paddler import protocol
from paddler.cli.process import OneLineFormatter
from tests.support.llamacpp import stop_process
from tests.support.processes import paddler_process

FORGED = "2026-12-01 00:00:00,000 WARNING paddler: FORGED"
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)


async def raw_request(host: str, port: str, path: bytes, request_id: bytes) -> bytes:
    """Send a POST byte for byte as given; return the status line."""
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST " + path + b" HTTP/1.1\r\nHost: balancer\r\nX-Request-Id: " + request_id + b"\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return status_line


async def test_agent_names_and_request_paths_cannot_forge_log_lines(
    session: aiohttp.ClientSession,
) -> None:
    """An agent name with a newline and ESC is refused; an ESC in X-Request-Id is refused by
    the server; a path with %0a, %0d and %1b is logged escaped: every line of stderr is the
    balancer's."""
    process = await paddler_process(
        "balancer",
        "--log-format=text",
        "--management-port=0",
        "--reverseproxy-port=0",
        "--request-buffer-size=0",
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def line_containing(text: str) -> str:
        assert process.stderr is not None
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, f"stderr ended before a line containing {text!r}"
            lines.append(line)
            if text in line:
                return line

    try:
        async with asyncio.timeout(20):
            management = (await line_containing("management listening")).split()[-1]
            proxy = (await line_containing("reverseproxy listening")).split()[-1]

            socket = await session.ws_connect(management + protocol.AGENT_SOCKET_PATH)
            evil_name = f"gpu\n{FORGED}\x1b[2J"
            register = {
                "v": 1,
                "type": "register",
                "name": evil_name,
                "host": "127.0.0.1",
                "port": 1,
                "status": {"type": "status", "state": "ok", "slots_idle": 1},
            }
            await socket.send_str(json.dumps(register))
            reply = protocol.parse_balancer_message(await socket.receive_str())
            assert isinstance(reply, protocol.Error)
            assert "name may not contain control or format characters" in reply.message
            await socket.close()
            await line_containing("refused agent message")

            host, port = proxy.removeprefix("http://").split(":")
            # The HTTP server itself refuses a control character in a header value.
            assert b" 400 " in await raw_request(host, port, b"/completion", b"id\x1b[2J")
            forged = FORGED.replace(" ", "%20").encode()
            # A decoded newline reaches the proxy like any other path (with --proxy-server
            # aiohttp, no route matches it: a plain 404), and its request log, escaped.
            assert b" 503 " in await raw_request(host, port, b"/v1%0a" + forged, b"a-good-id")
            newline_logged = await line_containing("buffer_full")
            # A carriage return and an escape do reach the proxy, and its request log.
            path = b"/completion%0d" + forged + b"%1b[2J"
            assert b" 503 " in await raw_request(host, port, path, b"a-good-id")
            logged = await line_containing("buffer_full")
    finally:
        await stop_process(process)
        lines.extend(line.decode() for line in (await process.stderr.read()).splitlines(True))
    assert "/v1\\n" + FORGED in newline_logged
    assert "/completion\\r" + FORGED + "\\x1b[2J" in logged
    for line in lines:
        # A record's own line, or a traceback indented under it: only a record starts a line.
        assert LINE.match(line) or line.startswith("    "), f"a forged line: {line!r}"
        assert "\x1b" not in line
    assert not any(line.startswith(FORGED) for line in lines)


def test_the_text_formatter_escapes_every_control_character() -> None:
    """Newlines, escapes and bidirectional overrides come out as their escapes, on one line."""
    import logging

    record = logging.LogRecord(
        "paddler", logging.INFO, __file__, 1, "%s", ("a\nb\x1bc\u202ed",), None
    )
    assert OneLineFormatter("%(message)s").format(record) == "a\\nb\\x1bc\\u202ed"
