"""An agent's connection after the upgrade, on a recording transport: messages handed over as
they arrive, reading paused while a frame waits for its budget, and every ending reported."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from paddler.balancer.management.agent_connection import AgentConnection, Ended
from paddler.balancer.management.frame_budget import FrameBudget
from paddler.balancer.management.websocket_frames import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    close_reason,
)
from tests.support.websocket import client_frame


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: list[Exception | None] = []
        self.write_pauses = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.write_pauses += 1


class Transport:
    """What the connection calls on its transport, recorded."""

    def __init__(self) -> None:
        self.protocol: Any = Inner()
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def frames(self) -> list[tuple[int, bytes]]:
        return [(data[0] & 0x0F, data[2:]) for data in self.written]


def connected(budget: FrameBudget | None = None) -> tuple[AgentConnection, Transport, Inner]:
    transport = Transport()
    inner = transport.protocol
    connection = AgentConnection.take_over(
        transport,  # type: ignore[arg-type]
        budget or FrameBudget(rate=1000, burst=1000, flood_seconds=5),
        1024,
        "too many frames",
    )
    assert transport.protocol is connection
    return connection, transport, inner


def text(message: str) -> bytes:
    return client_frame(TEXT, message.encode())


async def test_nothing_is_read_until_someone_takes_messages() -> None:
    """Taken over, the transport pauses; the first text goes to ``next_text``, then it pauses
    again until ``serve``."""
    connection, transport, _ = connected()
    assert not transport.reading
    waiting = asyncio.ensure_future(connection.next_text())
    await asyncio.sleep(0)
    assert transport.reading
    connection.data_received(text("register") + text("status 1"))
    assert await waiting == "register"
    assert not transport.reading
    seen: list[str] = []
    connection.serve(lambda message: seen.append(message) or None)
    assert seen == ["status 1"]
    assert transport.reading
    connection.data_received(text("status 2"))
    assert seen == ["status 1", "status 2"]


async def test_pings_get_pongs_and_pongs_are_ignored() -> None:
    """A ping is answered at once with its payload; a pong reaches nobody."""
    connection, transport, _ = connected()
    seen: list[str] = []
    connection.serve(lambda message: seen.append(message) or None)
    connection.data_received(client_frame(PING, b"beat") + client_frame(PONG, b"x"))
    assert transport.frames() == [(PONG, b"beat")]
    assert seen == []


async def test_a_frame_over_budget_waits_with_reading_paused() -> None:
    """Past the burst a frame is held, the transport paused, and both resume when due."""
    connection, transport, _ = connected(FrameBudget(rate=50, burst=1, flood_seconds=5))
    seen: list[str] = []
    connection.serve(lambda message: seen.append(message) or None)
    connection.data_received(text("one") + text("two") + text("three"))
    assert seen == ["one"]
    assert not transport.reading
    await asyncio.sleep(0.1)
    assert seen == ["one", "two", "three"]
    assert transport.reading


async def test_a_socket_over_budget_for_too_long_ends_as_a_flood() -> None:
    """Frames that keep waiting past ``flood_seconds`` end the connection, to be hung up."""
    connection, _, _ = connected(FrameBudget(rate=100, burst=1, flood_seconds=0.05))
    connection.serve(lambda message: None)
    for _ in range(20):
        connection.data_received(text("flood"))
    ended = await asyncio.wait_for(connection.ended, 5)
    assert ended.refusal == "too many frames"
    assert ended.hang_up


async def test_what_the_consumer_says_ends_the_connection() -> None:
    """A consumer's ``Ended`` ends it, and nothing after it is handed over."""
    connection, _, _ = connected()
    seen: list[str] = []

    def consume(message: str) -> Ended | None:
        seen.append(message)
        return Ended("it deregistered") if message == "bye" else None

    connection.serve(consume)
    connection.data_received(text("a") + text("bye") + text("after"))
    assert seen == ["a", "bye"]
    assert (await connection.ended).reason == "it deregistered"


async def test_a_consumer_that_raises_ends_the_connection_with_its_error() -> None:
    """An exception in the consumer reaches whoever awaits ``ended``, not the event loop."""
    connection, transport, _ = connected()

    def consume(message: str) -> Ended | None:
        raise RuntimeError("pool broke")

    connection.serve(consume)
    connection.data_received(text("a"))
    with pytest.raises(RuntimeError, match="pool broke"):
        await connection.ended
    await connection.close(1000, "", timeout=0.1)
    assert transport.closing


async def test_binary_broken_and_closing_frames_each_end_it_their_way() -> None:
    """Binary asks for a refusal; a broken frame carries its code; a close is answered."""
    connection, _, _ = connected()
    connection.serve(lambda message: None)
    connection.data_received(client_frame(BINARY, b"\0"))
    assert (await connection.ended).refusal == "frames must be JSON text"

    connection, _, _ = connected()
    connection.serve(lambda message: None)
    connection.data_received(client_frame(TEXT, b"\xff"))
    broken = (await connection.ended).broken
    assert broken is not None and broken.code == 1007

    connection, transport, _ = connected()
    connection.serve(lambda message: None)
    connection.data_received(client_frame(CLOSE, b"\x03\xe8"))
    assert (await connection.ended).reason == "its connection closed"
    assert transport.frames() == [(CLOSE, b"\x03\xe8")]
    assert transport.closing


async def test_our_close_waits_for_the_peers_and_drops_what_comes_before_it() -> None:
    """``close`` writes its frame, reads on until the peer's close frame, then closes."""
    connection, transport, _ = connected()
    seen: list[str] = []
    connection.serve(lambda message: seen.append(message) or None)
    closing = asyncio.ensure_future(connection.close(1008, "go away", timeout=5))
    await asyncio.sleep(0)
    assert close_reason(transport.frames()[0][1]) == (1008, "go away")
    connection.data_received(text("late report") + client_frame(CLOSE, b"\x03\xe8"))
    await closing
    assert seen == []
    assert transport.closing


async def test_losing_the_connection_ends_it_and_tells_the_inner_protocol() -> None:
    """aiohttp's protocol still hears of the loss; a waiting ``next_text`` gets None."""
    connection, _, inner = connected()
    waiting = asyncio.ensure_future(connection.next_text())
    await asyncio.sleep(0)
    connection.connection_lost(None)
    assert await waiting is None
    assert (await connection.ended).reason == "its connection closed"
    assert inner.lost == [None]


async def test_a_full_write_buffer_pauses_reading_until_it_drains() -> None:
    """A peer that sends pings and reads no pong is read no further while pongs pile up."""
    connection, transport, inner = connected()
    connection.serve(lambda message: None)
    connection.pause_writing()
    assert not transport.reading
    assert inner.write_pauses == 1
    connection.data_received(client_frame(PING, b"1"))
    assert transport.frames() == []
    connection.resume_writing()
    assert transport.frames() == [(PONG, b"1")]
    assert transport.reading
