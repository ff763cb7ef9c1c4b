"""A balancer's management socket, scripted by the test, for testing agents on their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, web

from paddler import protocol

AgentMessage = protocol.Register | protocol.Status | protocol.Deregister


@dataclass
class AgentConnection:
    number: int
    authorization: str | None
    messages: list[AgentMessage] = field(default_factory=list)
    close_code: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeBalancer:
    """Accepts agent sockets and records what they send.

    Set ``handshake_status`` to answer the upgrade with that HTTP status instead, or
    ``refusal`` to answer registrations with an ``error`` message.
    """

    def __init__(self) -> None:
        self.port = 0
        self.connections: list[AgentConnection] = []
        self.handshake_status: int | None = None
        self.refusal: str | None = None
        self._received: asyncio.Queue[tuple[int, AgentMessage]] = asyncio.Queue()
        self._sockets: set[web.WebSocketResponse] = set()

    async def next_message(self, timeout: float = 5.0) -> tuple[int, AgentMessage]:
        """The next message from any agent, with the number of the connection it came on."""
        async with asyncio.timeout(timeout):
            return await self._received.get()

    async def drop_sockets(self) -> None:
        """Close every agent socket from the balancer's side, as a restarting balancer would."""
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.handshake_status is not None:
            return web.Response(status=self.handshake_status, text="no")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connection = AgentConnection(
            len(self.connections) + 1, request.headers.get("Authorization")
        )
        self.connections.append(connection)
        self._sockets.add(ws)
        try:
            async for frame in ws:
                message = protocol.parse_agent_message(frame.data)
                connection.messages.append(message)
                self._received.put_nowait((connection.number, message))
                if isinstance(message, protocol.Register):
                    if self.refusal is not None:
                        await ws.send_str(protocol.encode(protocol.Error(message=self.refusal)))
                        await ws.close()
                    else:
                        reply = protocol.Registered(agent_id=f"agent-{connection.number}")
                        await ws.send_str(protocol.encode(reply))
                elif isinstance(message, protocol.Deregister):
                    await ws.close()
        finally:
            self._sockets.discard(ws)
            connection.close_code = ws.close_code
            connection.closed.set()
        return ws


@contextlib.asynccontextmanager
async def running_fake_balancer(port: int = 0) -> AsyncIterator[FakeBalancer]:
    balancer = FakeBalancer()
    app = web.Application()
    app.router.add_get(protocol.AGENT_SOCKET_PATH, balancer.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    balancer.port = int(runner.addresses[0][1])
    try:
        yield balancer
    finally:
        # Like a balancer that shuts down: close the agent sockets first, or the server would
        # wait for their handlers to finish.
        await balancer.drop_sockets()
        await runner.cleanup()
