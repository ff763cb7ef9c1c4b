"""An agent's WebSocket after the upgrade: its frames read on the connection, its reports applied
as they arrive.

aiohttp does the handshake (``WebSocketResponse.prepare``); then ``take_over`` puts an
``AgentConnection`` between the transport and aiohttp's protocol, which still gets the
connection's loss, its end and the write pauses, and gets no more bytes. Each text message is
handed, in ``data_received``, to the handler's callback: no task is woken, no future made and no
aiohttp message built per report.

Why: 1,000 agents each reporting once a second cost the balancer 65-72 µs of CPU a frame, and
aiohttp's read path alone (a handler that reads the frames and does nothing with them, on the
balancer's uvloop) 37-47 µs of it: its reader, its message queue, the wake-up of the handler's
task and ``receive``'s checks. The same handler reading the frames on the transport
(``FrameParser``) cost 25-26 µs a frame, most of it the kernel's and the loop's share (``python
-m bench.report_load``, 1,000 agents, 2 shared cores; the figures before and after this module
are in docs/benchmarks.md, ``report-path``).

What the connection does itself, as aiohttp did:

- answers pings with pongs, ignores pongs, and answers a close frame with one before closing;
- closes with 1002, 1007 or 1009 a connection that breaks the protocol (see
  ``websocket_frames``), with no handshake: the stream can no longer be parsed;
- spends a ``FrameBudget`` token on every frame but a close one; with none left it stops
  reading (the transport too, so that TCP pushes back on the sender) until the token is due,
  and ends the connection when the budget says it is flooding;
- stops reading while the transport's write buffer is over its high-water mark (a peer that
  sends pings and reads no pong), and while nobody takes messages (before registration).

A client must wait for the handshake's answer before it sends a frame (RFC 6455 §4.1): bytes
that came with the upgrade request went to aiohttp's parser, and are not read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from paddler.balancer.management.frame_budget import FrameBudget
from paddler.balancer.management.websocket_frames import (
    BINARY,
    CLOSE,
    PING,
    TEXT,
    CloseCode,
    FrameError,
    FrameParser,
    close_frame,
    close_reason,
    pong_frame,
    text_frame,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ended:
    """Why a connection stopped handing out messages."""

    reason: str
    """Why the agent goes, for the pool's log line."""
    refusal: str | None = None
    """What to tell the agent in an ``error`` message before closing with 1008, if anything."""
    hang_up: bool = False
    """Close as soon as the close frame is written, reading nothing more."""
    broken: FrameError | None = None
    """The protocol violation that ended it: close with its code, at once."""


OnText = Callable[[str], "Ended | None"]
"""Takes one text message; returns None to go on, or why the connection ends."""


class AgentConnection(asyncio.Protocol):
    """The reading side of one agent's WebSocket, and the few frames it writes itself."""

    def __init__(
        self,
        transport: asyncio.Transport,
        inner: asyncio.Protocol,
        budget: FrameBudget,
        max_message: int,
        flood_refusal: str,
    ) -> None:
        self._transport = transport
        self._inner = inner
        self._budget = budget
        self._flood_refusal = flood_refusal
        self._parser = FrameParser(max_message)
        self._loop = asyncio.get_running_loop()
        self._on_text: OnText | None = None
        self._first: asyncio.Future[str | None] | None = None
        self._pauses = {"consumer"}
        self._held: tuple[int, bytes] | None = None
        """A frame read while the budget had no token, applied when one is due."""
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Future[None] | None = None
        """Set once our close frame is written: done when the peer's answers it."""
        self._lost = False
        self._broken = False
        """Whether the peer broke the protocol: what follows can no longer be parsed."""
        self.ended: asyncio.Future[Ended] = self._loop.create_future()

    @classmethod
    def take_over(
        cls,
        transport: asyncio.BaseTransport,
        budget: FrameBudget,
        max_message: int,
        flood_refusal: str,
    ) -> AgentConnection:
        """Read ``transport`` from now on; pass its other events on to its current protocol.

        ``flood_refusal`` is what the agent is told when its budget says it is flooding.
        """
        stream = cast(asyncio.Transport, transport)  # uvloop's do not derive from it
        inner = cast(asyncio.Protocol, stream.get_protocol())
        connection = cls(stream, inner, budget, max_message, flood_refusal)
        stream.set_protocol(connection)
        stream.pause_reading()
        return connection

    @property
    def closed(self) -> bool:
        return self._lost or self._transport.is_closing()

    async def next_text(self) -> str | None:
        """The next text message, or None if the connection ended first (see ``ended``)."""
        if self.ended.done():
            return None
        self._first = self._loop.create_future()
        self._unpause("consumer")
        return await self._first

    def serve(self, on_text: OnText) -> None:
        """Hand every text message from now on to ``on_text``, as it arrives."""
        self._on_text = on_text
        self._unpause("consumer")

    def send_text(self, text: str) -> None:
        if not self.closed:
            self._transport.write(text_frame(text))

    async def close(self, code: int, reason: str, *, timeout: float, hang_up: bool = False) -> None:
        """Send a close frame and wait up to ``timeout`` for the peer's (none with ``hang_up``,
        or after a protocol violation), then close the transport. Idempotent."""
        if self.closed:
            return
        if self._closing is not None:
            await asyncio.wait([self._closing], timeout=timeout)
            self._transport.close()
            return
        self._transport.write(close_frame(code, reason))
        closing = self._closing = self._loop.create_future()
        if hang_up or self._broken:
            self._transport.close()
            return
        self._end(Ended("the balancer closed its connection"))
        # Read again, to see the peer's close frame; what comes before it is dropped.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = None
        self._pauses.difference_update(("consumer", "budget", "ended"))
        self._pump()
        if not self._pauses and not self.closed:
            self._transport.resume_reading()
        await asyncio.wait([closing], timeout=timeout)
        self._transport.close()

    def hang_up(self) -> None:
        """Close the transport without a close frame."""
        self._transport.close()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        self._pump()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end(
            Ended("its connection closed" if exc is None else f"its connection failed: {exc!r}")
        )
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()
        self._pause("writing")

    def resume_writing(self) -> None:
        self._inner.resume_writing()
        self._unpause("writing")

    # the reading

    def _pump(self) -> None:
        """Apply the messages already received, until none is whole or reading pauses."""
        parser = self._parser
        budget = self._budget
        while not self._pauses:
            try:
                message = parser.next()
            except FrameError as error:
                self._end(Ended(f"it broke the WebSocket protocol: {error.reason}", broken=error))
                return
            if message is None:
                return
            opcode = message[0]
            if self._closing is not None:
                if opcode == CLOSE and not self._closing.done():
                    self._closing.set_result(None)
                continue
            if opcode != CLOSE and (wait := budget.take()) > 0:
                self._held = message
                self._pause("budget")
                self._timer = self._loop.call_later(wait, self._token_due)
                return
            self._apply(*message)

    def _token_due(self) -> None:
        self._timer = None
        if self._budget.flooding():
            self._end(Ended("it flooded its socket", refusal=self._flood_refusal, hang_up=True))
            return
        held, self._held = self._held, None
        if held is not None:
            self._apply(*held)
        self._unpause("budget")

    def _apply(self, opcode: int, payload: bytes) -> None:
        if opcode == TEXT:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                error = FrameError(CloseCode.INVALID_TEXT, "a text frame that is not UTF-8")
                self._end(Ended(f"it broke the WebSocket protocol: {error.reason}", broken=error))
                return
            first = self._first
            if first is not None:
                self._first = None
                self._pause("consumer")
                if not first.done():
                    first.set_result(text)
                return
            on_text = self._on_text
            assert on_text is not None  # reading pauses until there is a consumer
            try:
                ended = on_text(text)
            except Exception as error:
                self._pause("ended")
                if not self.ended.done():
                    self.ended.set_exception(error)
                return
            if ended is not None:
                self._end(ended)
        elif opcode == PING:
            self._transport.write(pong_frame(payload))
        elif opcode == CLOSE:
            try:
                close_reason(payload)
            except FrameError as error:
                self._end(Ended(f"it broke the WebSocket protocol: {error.reason}", broken=error))
                return
            self._transport.write(close_frame(CloseCode.NORMAL, ""))
            self._end(Ended("its connection closed"))
            self._transport.close()
        elif opcode == BINARY:
            self._end(Ended("it sent a binary frame", refusal="frames must be JSON text"))

    def _end(self, ended: Ended) -> None:
        self._pause("ended")
        if ended.broken is not None:
            self._broken = True
        if not self.ended.done():
            self.ended.set_result(ended)
        first = self._first
        if first is not None:
            self._first = None
            if not first.done():
                first.set_result(None)

    def _pause(self, why: str) -> None:
        if not self._pauses and not self._lost:
            self._transport.pause_reading()
        self._pauses.add(why)

    def _unpause(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if self._pauses or self._lost:
            return
        self._pump()
        if not self._pauses and not self.closed:
            self._transport.resume_reading()
