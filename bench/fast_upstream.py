"""A fake llama.cpp fast enough to find a proxy's ceiling, on many ports at once.

Usage: ``python -m bench.fast_upstream --ports N --slots S`` (the scale benchmark starts it; see
``child_control`` for the stdin/stdout contract). Its ready line is ``{"ports": [...]}``: one
port per simulated llama.cpp server, each with its own ``total_slots`` and busy count, since the
balancer reaches every agent's address itself (``GET /health`` and ``/props``) before counting it.

Real llama.cpp cannot saturate a proxy (a token costs it far more than a proxy's hop), so this
answers from memory, and sends what llama.cpp sends (see ``llamacpp_wire``): the same headers,
keep-alive for at most 100 answers and 5 idle seconds, one HTTP chunk per SSE event, the final
event with ``timings``, and a closed connection after every stream. Per request, from the JSON
body (llama.cpp ignores fields it does not know):

- ``"stream": false`` (default): the answer at once, or after ``"bench_first_ms"``;
- ``"stream": true``: ``"n_predict"`` token events, the first after ``"bench_first_ms"``, then
  one every ``"bench_interval_ms"``, then the final event;
- ``"seq"``: recorded in arrival order (``arrivals PATH`` writes them), for FIFO checks.

Commands: ``stats`` (requests, events sent, open connections, the most requests any port had
beyond its slots), ``reset`` (clears the arrivals), ``arrivals PATH``.

Hand-written HTTP on ``asyncio.Protocol`` rather than aiohttp's server, because the upstream
must cost much less than the proxies it serves (the benchmark reports its CPU per cell). Measured
with wrk at 32 connections on this machine's 2 shared cores: a bare aiohttp handler answering the
same 1.7 KB costs 45-52 µs of CPU per request (asyncio or uvloop), this one 19-23 µs, and nginx's
whole hop costs 21-33 µs. It parses only what proxies and load generators send: a request line,
headers and a ``Content-Length`` body (a chunked request body is answered 411 and the connection
closed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench import llamacpp_wire as wire
from bench.child_control import run_fast, serve_commands
from bench.processes import raise_open_file_limit

N_CTX = 4096
_GENERATING = frozenset({"/completion", "/completions", "/v1/completions", "/v1/chat/completions"})


@dataclass
class Server:
    """One simulated llama.cpp: its slots and how many of its requests are running."""

    slots: int
    props: bytes
    busy: int = 0


@dataclass
class State:
    arrivals: list[int] = field(default_factory=list)
    requests: int = 0
    events: int = 0
    oversubscribed: int = 0
    connections: set[Connection] = field(default_factory=set)
    accepted: int = 0
    """Connections accepted so far (a proxy that reuses them well opens few)."""


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, state: State) -> None:
        self._server = server
        self._state = state
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._answered = 0
        self._busy = False
        """A request is being answered: later bytes wait (no pipelining past it)."""
        self._timer: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()

    @property
    def busy(self) -> bool:
        return self._busy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._state.connections.add(self)
        self._state.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._release()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._parse()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _parse(self) -> None:
        while not self._busy and self._transport is not None and not self._transport.is_closing():
            end = self._buffer.find(b"\r\n\r\n")
            if end == -1:
                return
            lines = bytes(self._buffer[:end]).split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            target = rest.rpartition(b" ")[0].split(b"?", 1)[0].decode("latin-1")
            length, client_closes = 0, lines[0].endswith(b"HTTP/1.0")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self._send(wire.json_answer("411 Length Required", b"", close=True), True)
                    return
                elif name == b"connection":
                    client_closes = value.strip().lower() == b"close"
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            self._answered += 1
            close = client_closes or self._answered >= wire.KEEP_ALIVE_MAX
            self._route(method, target, body, close)

    def _route(self, method: bytes, path: str, body: bytes, close: bool) -> None:
        server = self._server
        if method == b"GET" and path in ("/health", "/v1/health"):
            self._send(wire.json_answer("200 OK", b'{"status":"ok"}', close=close), close)
        elif method == b"GET" and path == "/props":
            self._send(wire.json_answer("200 OK", server.props, close=close), close)
        elif method == b"GET" and path == "/slots":
            answer = wire.slots(server.slots, min(server.busy, server.slots), N_CTX)
            self._send(wire.json_answer("200 OK", answer, close=close), close)
        elif method == b"GET" and path in ("/models", "/v1/models"):
            self._send(wire.json_answer("200 OK", wire.models(), close=close), close)
        elif method == b"POST" and path in _GENERATING:
            self._complete(path, body, close)
        else:
            answer = wire.error_body(404, "File Not Found", "not_found_error")
            self._send(wire.json_answer("404 Not Found", answer, close=close), close)

    def _complete(self, path: str, body: bytes, close: bool) -> None:
        try:
            request: dict[str, Any] = json.loads(body)
            tokens = max(1, int(request.get("n_predict", request.get("max_tokens", 1))))
            first = float(request.get("bench_first_ms", 0)) / 1000
            interval = float(request.get("bench_interval_ms", 0)) / 1000
        except (ValueError, TypeError, AttributeError):
            answer = wire.error_body(
                400, "Failed to parse the request body as JSON", "invalid_request_error"
            )
            self._send(wire.json_answer("400 Bad Request", answer, close=close), close)
            return
        state = self._state
        state.requests += 1
        if isinstance(seq := request.get("seq"), int):
            state.arrivals.append(seq)
        self._busy = True
        self._server.busy += 1
        if self._server.busy > self._server.slots:
            state.oversubscribed = max(state.oversubscribed, self._server.busy - self._server.slots)
        chat = path == "/v1/chat/completions"
        if request.get("stream") is True:
            self._later(first, self._stream, chat, 1, tokens, interval)
        else:
            self._later(first, self._answer, chat, tokens, close)

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        if delay <= 0:
            callback(*args)
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, callback, *args)

    def _answer(self, chat: bool, tokens: int, close: bool) -> None:
        body = wire.chat_answer(tokens) if chat else wire.final(tokens, 0, stream=False)
        self._release()
        self._send(wire.json_answer("200 OK", body, close=close), close)

    def _stream(self, chat: bool, number: int, tokens: int, interval: float) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        out = (
            wire.head("200 OK", wire.EVENT_STREAM, length=None, close=False) if number == 1 else b""
        )
        out += wire.chat_event(number, last=False) if chat else wire.token_event(number)
        self._state.events += 1
        if number < tokens:
            transport.write(out)
            self._later(interval, self._stream, chat, number + 1, tokens, interval)
            return
        end = (
            wire.chat_event(number + 1, last=True) + wire.chunk(wire.DONE)
            if chat
            else wire.chunk(wire.final(tokens, 0, stream=True))
        )
        self._state.events += 1
        self._release()
        # llama.cpp closes the connection after every stream, whatever its headers said.
        self._send(out + end + wire.LAST_CHUNK, True)

    def _release(self) -> None:
        if self._busy:
            self._busy = False
            self._server.busy -= 1
            self._timer = None

    def _send(self, data: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self.idle_since = time.monotonic()
        if close:
            transport.close()
        elif self._buffer:
            asyncio.get_running_loop().call_soon(self._parse)


async def close_idle(state: State) -> None:
    """llama.cpp closes a keep-alive connection idle for 5 s; one sweep a second does that."""
    while True:
        await asyncio.sleep(1.0)
        cutoff = time.monotonic() - wire.KEEP_ALIVE_SECONDS
        for connection in list(state.connections):
            if not connection.busy and connection.idle_since < cutoff:
                connection.close()


async def main(ports: int, slots: int) -> None:
    raise_open_file_limit()
    loop = asyncio.get_running_loop()
    state = State()
    listeners = []
    for _ in range(ports):
        server = Server(slots, wire.props(slots, N_CTX))
        factory = functools.partial(Connection, server, state)
        listener = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        listeners.append(listener)
    bound = [listener.sockets[0].getsockname()[1] for listener in listeners]
    sweeper = asyncio.create_task(close_idle(state))

    async def handle(command: str) -> dict[str, Any]:
        verb, _, argument = command.partition(" ")
        if verb == "stats":
            return {
                "requests": state.requests,
                "events": state.events,
                "connections": len(state.connections),
                "accepted": state.accepted,
                "oversubscribed": state.oversubscribed,
            }
        if verb == "reset":
            state.arrivals.clear()
            state.oversubscribed = 0
            return {"ok": True}
        if verb == "arrivals":
            # A few hundred kilobytes at most, between cells: blocking the loop is harmless.
            Path(argument).write_text(json.dumps(state.arrivals))  # noqa: ASYNC240
            return {"count": len(state.arrivals)}
        raise ValueError(f"unknown command {verb!r}")

    print(json.dumps({"ports": bound}), flush=True)
    try:
        await serve_commands(handle)
    finally:
        sweeper.cancel()
        for listener in listeners:
            listener.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fast_upstream")
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--slots", type=int, default=256)
    arguments = parser.parse_args()
    run_fast(main(arguments.ports, arguments.slots))
