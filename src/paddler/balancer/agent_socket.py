"""The management endpoint that agents connect to: one WebSocket per agent (see ``protocol``).

The token is checked before the upgrade; a wrong or missing one gets 401 and a log line. The first
frame must be ``register``, within ``REGISTER_TIMEOUT``. A malformed frame is answered with an
``error`` message naming the problem, and the socket is closed with code 1008: a confused agent
must not keep feeding the balancer reports it cannot trust. When the socket closes for any reason,
the agent is removed (unless a newer socket took it over).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from paddler import protocol
from paddler.balancer import errors
from paddler.balancer.agent_controller import AgentController
from paddler.balancer.agent_controller_pool import AgentControllerPool, FleetFull
from paddler.config import Address

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
_POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION


def token_matches(request: web.Request, token: str | None) -> bool:
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, offered = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        offered.strip().encode(), token.encode()
    )


class AgentSocket:
    def __init__(self, pool: AgentControllerPool, token: str | None, heartbeat: float) -> None:
        self._pool = pool
        self._token = token
        self._heartbeat = heartbeat
        self._sockets: set[web.WebSocketResponse] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not token_matches(request, self._token):
            log.warning(
                "refused an agent connection from %s: missing or wrong token", request.remote
            )
            return errors.unauthorized().response()
        socket = web.WebSocketResponse(
            heartbeat=self._heartbeat,
            max_msg_size=protocol.MAX_MESSAGE_BYTES,
            timeout=CLOSE_TIMEOUT,  # for the agent's answer to our close frame
        )
        await socket.prepare(request)
        self._sockets.add(socket)
        agent: AgentController | None = None
        session = 0
        reason = "its connection closed"
        try:
            agent, session = await self._register(request, socket)
            if agent is None:
                return socket
            async for frame in socket:
                if frame.type is not WSMsgType.TEXT:
                    if frame.type is WSMsgType.ERROR:
                        reason = f"its connection failed: {socket.exception()!r}"
                        break
                    await self._refuse(socket, request, "frames must be JSON text")
                    break
                try:
                    message = protocol.parse_agent_message(frame.data)
                except protocol.ProtocolError as error:
                    await self._refuse(socket, request, f"malformed message: {error}")
                    break
                if isinstance(message, protocol.Status):
                    if not self._pool.report(agent, session, message):
                        reason = "a newer connection took it over"
                        break
                elif isinstance(message, protocol.Deregister):
                    reason = "it deregistered"
                    break
                else:
                    await self._refuse(socket, request, "already registered on this connection")
                    break
            return socket
        finally:
            self._sockets.discard(socket)
            if agent is not None:
                self._pool.remove(agent, session, reason)
            if not socket.closed:
                await socket.close()

    async def _register(
        self, request: web.Request, socket: web.WebSocketResponse
    ) -> tuple[AgentController | None, int]:
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                frame = await socket.receive()
        except TimeoutError:
            await self._refuse(socket, request, f"no register message within {REGISTER_TIMEOUT:g}s")
            return None, 0
        if frame.type is not WSMsgType.TEXT:
            if frame.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                await self._refuse(socket, request, "frames must be JSON text")
            return None, 0
        try:
            message = protocol.parse_agent_message(frame.data)
        except protocol.ProtocolError as error:
            await self._refuse(socket, request, f"malformed message: {error}")
            return None, 0
        if not isinstance(message, protocol.Register):
            await self._refuse(
                socket, request, f"the first message must be register, not {message.type}"
            )
            return None, 0
        address = Address(message.scheme, message.host, message.port)
        try:
            agent, session = self._pool.register(message.name, address, message.status)
        except FleetFull as error:
            await self._refuse(socket, request, str(error))
            return None, 0
        await socket.send_str(protocol.encode(protocol.Registered(agent_id=agent.id)))
        return agent, session

    async def _refuse(
        self, socket: web.WebSocketResponse, request: web.Request, message: str
    ) -> None:
        log.warning("refused agent message from %s: %s", request.remote, message)
        if not socket.closed:
            await socket.send_str(protocol.encode(protocol.Error(message=message)))
            await socket.close(code=_POLICY_VIOLATION, message=message[:120].encode())

    async def close_all(self) -> None:
        """Close every agent socket, for shutdown."""
        for socket in list(self._sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"balancer shutting down")
