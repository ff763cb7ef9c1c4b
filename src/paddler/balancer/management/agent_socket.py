"""The management endpoint that agents connect to: one WebSocket per agent (see ``protocol``).

The token is checked before the upgrade; a wrong or missing one gets 401 and a log line. aiohttp
answers the upgrade; from then on the socket's frames are read by an ``AgentConnection`` (see
there, and ``websocket_frames``), which hands each text message to this module in
``data_received``. The first message must be ``register``, within ``REGISTER_TIMEOUT``. A
malformed message is answered with an ``error`` message naming the problem, and the socket is
closed with code 1008: a confused agent must not keep feeding the balancer reports it cannot
trust. A frame that breaks RFC 6455 closes it with the RFC's code (1002, 1007, 1009) and a log
line. When the socket closes for any reason, the agent is removed (unless a newer socket took it
over).

A socket whose agent the pool no longer counts (removed for silence after ``stale_after``, or
taken over by a newer registration at its address) is closed by ``run``, which looks every
``stale_after / 2`` seconds: that is how a peer that vanished without closing its connection is
let go. The sockets carry no WebSocket heartbeat of their own: aiohttp's scheduled a callback
for every frame received, about 16 µs of the balancer's CPU per frame, to learn what the reports
already tell. (The agents ping the balancer themselves, to learn that it is gone; the
connection answers those.)

A status message identical to the one before it on the same socket (an idle server's report,
sent every second) is not parsed again: the message it parsed to is immutable, and is handed to
the pool again, which sees by identity that nothing but the report's time changed.

Each socket also owns two guards against an agent that lies or floods:

- a verification task (see ``agent_verifier``): the agent counts for nothing until the balancer
  has reached its address itself; the task ends with the socket;
- a frame budget (see ``frame_budget``): frames beyond ``STATUS_FRAMES_PER_SECOND`` wait, and a
  socket over budget for ``STATUS_FLOOD_SECONDS`` in a row is closed with 1008.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import WSCloseCode, web

from paddler import protocol
from paddler.balancer import errors
from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool, FleetFull
from paddler.balancer.management.agent_connection import AgentConnection, Ended, OnText
from paddler.balancer.management.agent_verifier import AgentVerifier
from paddler.balancer.management.frame_budget import FrameBudget
from paddler.config import Address
from paddler.lifecycle import wait_or_shutdown

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
    def __init__(
        self,
        pool: AgentControllerPool,
        verifier: AgentVerifier,
        token: str | None,
        stale_after: float,
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._token = token
        self._stale_after = stale_after
        self._connections: set[AgentConnection] = set()
        self._agents: dict[AgentConnection, tuple[AgentController, int]] = {}
        """The connections past registration, with their agent and its session."""

    async def run(self, shutdown: asyncio.Event) -> None:
        """Close, every ``stale_after / 2`` seconds, the sockets whose agent is not counted."""
        while not await wait_or_shutdown(shutdown, self._stale_after / 2):
            self.close_orphans()

    def close_orphans(self) -> None:
        """Close the sockets whose session the pool no longer owns: their handlers then end.

        The connection is closed without a close frame: its peer sent nothing for
        ``stale_after`` seconds (or another socket took its agent over), and a close handshake
        with a peer that is gone would wait for an answer that never comes.
        """
        for connection, (agent, session) in list(self._agents.items()):
            if not self._pool.owns(agent, session):
                log.info(
                    "closing the socket of agent %s: the balancer no longer counts it", agent.name
                )
                del self._agents[connection]
                connection.hang_up()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not token_matches(request, self._token):
            log.warning(
                "refused an agent connection from %s: missing or wrong token", request.remote
            )
            return errors.unauthorized().response()
        socket = web.WebSocketResponse(
            max_msg_size=protocol.MAX_MESSAGE_BYTES,
            compress=False,  # the connection reads frames itself, and inflates none
            timeout=CLOSE_TIMEOUT,  # were aiohttp's close to wait for an answer: as ours does
        )
        await socket.prepare(request)
        assert request.transport is not None  # prepare() has just written to it
        connection = AgentConnection.take_over(
            request.transport,
            FrameBudget(
                protocol.STATUS_FRAMES_PER_SECOND,
                protocol.STATUS_FRAME_BURST,
                protocol.STATUS_FLOOD_SECONDS,
            ),
            protocol.MAX_MESSAGE_BYTES,
            f"more than {protocol.STATUS_FRAMES_PER_SECOND:g} frames per second "
            f"for {protocol.STATUS_FLOOD_SECONDS:g}s",
        )
        self._connections.add(connection)
        agent: AgentController | None = None
        session = 0
        reason = "its connection closed"
        verifying: asyncio.Task[None] | None = None
        try:
            agent, session = await self._register(request, connection)
            if agent is None:
                return socket
            self._agents[connection] = (agent, session)
            verifying = asyncio.create_task(
                self._verifier.verify(agent, session), name=f"verify {agent.id}"
            )
            connection.serve(self._reports(agent, session))
            reason = await self._finish(request, connection, await connection.ended)
            return socket
        finally:
            if verifying is not None:
                verifying.cancel()
                await asyncio.wait([verifying])
                if not verifying.cancelled() and (failure := verifying.exception()) is not None:
                    log.error("verifying %s failed", verifying.get_name(), exc_info=failure)
            self._connections.discard(connection)
            self._agents.pop(connection, None)
            if agent is not None:
                self._pool.remove(agent, session, reason)
            await connection.close(WSCloseCode.OK, "", timeout=CLOSE_TIMEOUT)
            # aiohttp's own close finds the transport closed, and does nothing.
            await socket.close()

    def _reports(self, agent: AgentController, session: int) -> OnText:
        """What takes the agent's messages once it is registered: called in ``data_received``."""
        pool = self._pool
        # The last status frame, as sent and as parsed: an agent whose server did not change
        # sends the very same frame every second, and a message is immutable.
        repeated_text = ""
        repeated: protocol.Status | None = None

        def on_text(text: str) -> Ended | None:
            nonlocal repeated_text, repeated
            message: protocol.Register | protocol.Status | protocol.Deregister
            if repeated is not None and text == repeated_text:
                message = repeated
            else:
                try:
                    message = protocol.parse_agent_message(text)
                except protocol.ProtocolError as error:
                    return Ended("it sent a malformed message", f"malformed message: {error}")
            if isinstance(message, protocol.Status):
                repeated_text, repeated = text, message
                if not pool.report(agent, session, message):
                    return Ended("a newer connection took it over")
                return None
            if isinstance(message, protocol.Deregister):
                return Ended("it deregistered")
            return Ended("it registered twice", "already registered on this connection")

        return on_text

    async def _register(
        self, request: web.Request, connection: AgentConnection
    ) -> tuple[AgentController | None, int]:
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                text = await connection.next_text()
        except TimeoutError:
            await self._refuse(
                connection, request, f"no register message within {REGISTER_TIMEOUT:g}s"
            )
            return None, 0
        if text is None:
            await self._finish(request, connection, await connection.ended)
            return None, 0
        try:
            message = protocol.parse_agent_message(text)
        except protocol.ProtocolError as error:
            await self._refuse(connection, request, f"malformed message: {error}")
            return None, 0
        if not isinstance(message, protocol.Register):
            await self._refuse(
                connection, request, f"the first message must be register, not {message.type}"
            )
            return None, 0
        address = Address(message.scheme, message.host, message.port)
        try:
            agent, session = self._pool.register(message.name, address, message.status)
        except FleetFull as error:
            await self._refuse(connection, request, str(error))
            return None, 0
        connection.send_text(protocol.encode(protocol.Registered(agent_id=agent.id)))
        return agent, session

    async def _finish(self, request: web.Request, connection: AgentConnection, ended: Ended) -> str:
        """Do what ``ended`` asks of the connection (a refusal, a close); return its reason."""
        if ended.broken is not None:
            log.warning(
                "closed the socket of an agent at %s (%d): %s",
                request.remote,
                ended.broken.code,
                ended.broken.reason,
            )
            await connection.close(ended.broken.code, ended.broken.reason, timeout=CLOSE_TIMEOUT)
        elif ended.refusal is not None:
            await self._refuse(connection, request, ended.refusal, hang_up=ended.hang_up)
        return ended.reason

    async def _refuse(
        self,
        connection: AgentConnection,
        request: web.Request,
        message: str,
        *,
        hang_up: bool = False,
    ) -> None:
        """Send ``error`` and close with 1008. With ``hang_up``, read nothing more first.

        A close waits for the agent's own close frame, reading what comes before it; behind a
        flood that is megabytes of frames. So for a flooder the connection is closed as soon
        as our close frame is written.
        """
        log.warning("refused agent message from %s: %s", request.remote, message)
        connection.send_text(protocol.encode(protocol.Error(message=message)))
        await connection.close(_POLICY_VIOLATION, message, timeout=CLOSE_TIMEOUT, hang_up=hang_up)

    async def close_all(self) -> None:
        """Close every agent socket, for shutdown."""
        await asyncio.gather(
            *(
                connection.close(
                    WSCloseCode.GOING_AWAY, "balancer shutting down", timeout=CLOSE_TIMEOUT
                )
                for connection in list(self._connections)
            )
        )
