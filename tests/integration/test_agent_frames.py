"""The agents' socket reads WebSocket frames itself: pings, fragments, closes and broken frames
are handled as RFC 6455 says, and the agent is removed when its socket ends."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from aiohttp import WSMsgType

from paddler import protocol
from paddler.balancer.management.websocket_frames import (
    CLOSE,
    CONTINUATION,
    PONG,
    TEXT,
    close_reason,
)
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import fake_upstream, not_found
from tests.support.websocket import client_frame, raw_socket, server_frame

pytestmark = pytest.mark.both_event_loops


def register_frame(port: int) -> bytes:
    register = protocol.Register(name="raw", host="127.0.0.1", port=port, status=ok(idle=2))
    return protocol.encode(register).encode()


async def test_a_ping_is_answered_with_a_pong_of_the_same_payload(
    session: aiohttp.ClientSession,
) -> None:
    """The agent's heartbeat pings get their pongs, as aiohttp's server gave them."""
    async with running_balancer() as running:
        socket = await session.ws_connect(
            running.management_url + protocol.AGENT_SOCKET_PATH, autoping=False
        )
        await socket.ping(b"are you there")
        answer = await socket.receive(timeout=5)
        assert answer.type is WSMsgType.PONG
        assert answer.data == b"are you there"
        await socket.close()


async def test_a_fragmented_report_is_applied_whole(session: aiohttp.ClientSession) -> None:
    """A register and a status split in fragments are read as the messages they make."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        reader, writer = await raw_socket(running.management_url + protocol.AGENT_SOCKET_PATH)
        register = register_frame(port)
        writer.write(client_frame(TEXT, register[:10], final=False))
        writer.write(client_frame(CONTINUATION, register[10:]))
        opcode, payload = await server_frame(reader)
        assert opcode == TEXT
        assert isinstance(protocol.parse_balancer_message(payload), protocol.Registered)
        status = protocol.encode(ok(idle=1, processing=1)).encode()
        writer.write(client_frame(TEXT, status[:5], final=False))
        writer.write(client_frame(CONTINUATION, status[5:]))
        await wait_until(lambda: running.pool.agents()[0].status.slots_processing == 1)
        writer.close()
        await wait_until(lambda: running.pool.agents() == [])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(TEXT, b"{}", masked=False), 1002),
        (client_frame(TEXT, b'{"v": "\xff"}'), 1007),
        (client_frame(TEXT, b"x" * (protocol.MAX_MESSAGE_BYTES + 1)), 1009),
    ],
)
async def test_a_broken_frame_closes_the_socket_with_its_code_and_removes_the_agent(
    session: aiohttp.ClientSession, frame: bytes, code: int
) -> None:
    """Unmasked, not UTF-8, over the size limit: a close frame with the RFC's code, then the
    connection ends, and the agent is gone."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        reader, writer = await raw_socket(running.management_url + protocol.AGENT_SOCKET_PATH)
        writer.write(client_frame(TEXT, register_frame(port)))
        assert (await server_frame(reader))[0] == TEXT
        assert len(running.pool.agents()) == 1
        writer.write(frame)
        opcode, payload = await server_frame(reader)
        assert opcode == CLOSE
        assert close_reason(payload)[0] == code
        # Closed with the rest of an oversized frame unread, the connection may end in a reset.
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        await wait_until(lambda: running.pool.agents() == [])
        writer.close()


async def test_a_binary_report_is_refused_with_the_reason(session: aiohttp.ClientSession) -> None:
    """Frames must be JSON text: error, then close 1008."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=2))
        assert agent.socket is not None
        await agent.socket.send_bytes(json.dumps({"type": "status"}).encode())
        reply = protocol.parse_balancer_message(await agent.socket.receive_str(timeout=5))
        assert isinstance(reply, protocol.Error)
        assert "JSON text" in reply.message
        closing = await agent.socket.receive(timeout=5)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert agent.socket.close_code == 1008
        await wait_until(lambda: running.pool.agents() == [])


async def test_an_agent_closing_its_socket_gets_a_close_frame_back_at_once(
    session: aiohttp.ClientSession,
) -> None:
    """The close handshake completes well within its timeout, and the agent is removed."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=2))
        assert agent.socket is not None
        async with asyncio.timeout(1.5):
            await agent.socket.close()
        assert agent.socket.close_code == 1000
        await wait_until(lambda: running.pool.agents() == [])


async def test_a_balancer_shutting_down_closes_every_agent_socket_with_1001(
    session: aiohttp.ClientSession,
) -> None:
    """Shutdown sends each agent a going-away close frame, and is not held up by them."""
    sockets = []
    async with fake_upstream(not_found) as port, running_balancer() as running:
        for number in range(3):
            agent = ScriptedAgent(session, running.management_url)
            await agent.register(
                f"a{number}", port, ok(idle=2), host=f"127.0.0.{number + 1}", verified=False
            )
            assert agent.socket is not None
            sockets.append(agent.socket)
    for socket in sockets:
        async with asyncio.timeout(5):
            closing = await socket.receive()
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 1001


async def test_a_pong_is_ignored_and_the_socket_goes_on(session: aiohttp.ClientSession) -> None:
    """An unsolicited pong changes nothing; the reports after it are applied."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        reader, writer = await raw_socket(running.management_url + protocol.AGENT_SOCKET_PATH)
        writer.write(client_frame(TEXT, register_frame(port)))
        assert (await server_frame(reader))[0] == TEXT
        writer.write(client_frame(PONG, b"unasked"))
        writer.write(client_frame(TEXT, protocol.encode(ok(idle=0, processing=2)).encode()))
        await wait_until(lambda: running.pool.agents()[0].status.slots_processing == 2)
        writer.close()
