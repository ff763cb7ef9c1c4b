"""The agent's one WebSocket to the balancer, kept open until shutdown.

Contract (see ``paddler.protocol`` for the messages):

- It connects to ``ws://{management_host}:{management_port}/api/v1/agents/socket`` (``wss://``
  with ``--management-scheme https``), or to the first of ``--management-addr``'s balancers that
  answers, with
  ``Authorization: Bearer <management_token>`` when a token is set, once the status board has a
  first observation.
- Over ``wss://`` it verifies the balancer's certificate and host name against
  ``management_ca_file`` (the system's store without one). A certificate it does not trust is
  logged as an error naming the reason, and the token is never sent; it retries, since the
  operator may be fixing either side. Sending a token over plain ``ws://`` to an address that is
  not loopback is allowed (a private network may be trusted) but warned about once.
- It sends ``register`` first and waits for ``registered``. An ``error`` answer, or HTTP 401/403
  on the handshake, is logged as a refusal and retried like any other failure: the operator may
  be fixing the balancer's side.
- Then it sends ``status`` as soon as the board's status changes, and at least once per
  ``reporting_interval`` otherwise; never more than ``protocol.STATUS_FRAMES_PER_SECOND`` (changes
  closer together go as one, the newest), which is the balancer's budget.
- When the socket cannot be opened or drops, it reconnects after a jittered backoff that starts
  at 0.2 s and doubles up to ``reconnect_backoff_max``. With several balancers, it tries the next
  one at once, and waits only once each has failed since the last link: a balancer that dies
  costs its agents no more than a reconnection to another (docs/ha.md). It stays with the one it
  is linked to while that link holds. Each outage is logged once per balancer, and again only if
  its reason changes; recovery is logged too.
- On shutdown it sends ``deregister`` and closes the socket, within ``goodbye_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Literal

import aiohttp

from paddler import protocol
from paddler.agent.backoff import Backoff
from paddler.agent.interruptible import unless_shutdown
from paddler.agent.status_board import StatusBoard
from paddler.config import Address, AgentConfig, is_loopback
from paddler.lifecycle import wait_or_shutdown
from paddler.tls import client_context

logger = logging.getLogger(__name__)

_INITIAL_BACKOFF = 0.2


class BalancerRefused(Exception):
    """The balancer answered, and said no: a bad token or a rejected registration."""


class LinkLost(Exception):
    """The socket could not be opened, or closed while we were using it."""


class BalancerUntrusted(Exception):
    """The balancer's TLS certificate failed verification: we refuse it, not it us."""


class BalancerLink:
    """Registers this agent with the balancer and keeps it informed of the board's status.

    ``config.name`` and ``config.external`` are sent as they are; the caller resolves defaults
    (such as a port picked by the agent's own llama.cpp) before building the link.
    """

    def __init__(
        self,
        config: AgentConfig,
        session: aiohttp.ClientSession,
        board: StatusBoard,
        *,
        handshake_timeout: float = 10.0,
        goodbye_timeout: float = 2.0,
    ) -> None:
        self._config = config
        self._session = session
        self._board = board
        self._handshake_timeout = handshake_timeout
        self._goodbye_timeout = goodbye_timeout
        websocket_scheme = "wss" if config.management_scheme == "https" else "ws"
        self._balancers = config.balancers
        self._urls = [
            Address(websocket_scheme, host, port).url + protocol.AGENT_SOCKET_PATH
            for host, port in self._balancers
        ]
        self._current = 0
        """The balancer linked to, or tried next (an index of ``_balancers``)."""
        self._ssl = client_context(config.management_ca_file) if websocket_scheme == "wss" else True
        token = config.management_token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._outage: str | None = None
        """What broke the last link, or kept it from being made (None while linked)."""
        self._outages: dict[int, str] = {}
        """What was last logged of each balancer that could not be linked to."""
        self.agent_id: str | None = None
        """The id the balancer gave us on the current socket, None while not registered."""

    async def run(self, shutdown: asyncio.Event) -> None:
        backoff = Backoff(_INITIAL_BACKOFF, max(self._config.reconnect_backoff_max, 0.2))
        config = self._config
        if config.management_token and config.management_scheme != "https":
            for host, _ in self._balancers:
                if not is_loopback(host):
                    logger.warning(
                        "sending the management token to %s in clear text (ws://); use "
                        "--management-scheme https with a balancer that has "
                        "--management-tls-cert",
                        host,
                    )
        if await unless_shutdown(self._board.newer_than(0), shutdown) is None:
            return
        failed = 0
        """Balancers that failed in a row since the last link."""
        while not shutdown.is_set():
            linked = False
            try:
                linked = await self._connect_and_report(shutdown, backoff)
            except BalancerRefused as refusal:
                self._report_outage(f"the balancer at {self._url} refused us: {refusal}", True)
            except BalancerUntrusted as untrusted:
                self._report_outage(str(untrusted), True)
            except LinkLost as loss:
                self._report_outage(str(loss), False)
            except (aiohttp.ClientError, OSError, TimeoutError, protocol.ProtocolError) as error:
                reason = str(error) or type(error).__name__
                self._report_outage(f"link to the balancer at {self._url} failed: {reason}", False)
            finally:
                linked = linked or self.agent_id is not None
                self.agent_id = None
            if shutdown.is_set():
                return
            failed = 1 if linked else failed + 1
            if len(self._urls) > 1:
                self._current = (self._current + 1) % len(self._urls)
                if failed < len(self._urls):
                    continue  # the next balancer at once: this one may be gone for good
                failed = 0
            if await wait_or_shutdown(shutdown, backoff.next_delay()):
                return

    @property
    def _url(self) -> str:
        return self._urls[self._current]

    async def _connect_and_report(self, shutdown: asyncio.Event, backoff: Backoff) -> bool:
        """Link and report until shutdown or a failure (raised); whether it got registered."""
        ws = await unless_shutdown(self._connect(), shutdown)
        if ws is None:
            return False
        try:
            version, status = self._board.current()
            await ws.send_str(protocol.encode(self._registration(status)))
            agent_id = await unless_shutdown(self._await_registered(ws), shutdown)
            if agent_id is None:
                return False
            self._registered(agent_id)
            backoff.reset()
            await self._report(ws, version, shutdown)
            return True
        finally:
            await self._say_goodbye(ws, deregister=shutdown.is_set())

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                return await self._session.ws_connect(
                    self._url,
                    headers=self._headers,
                    ssl=self._ssl,
                    heartbeat=max(2 * self._config.reporting_interval, 1.0),
                    max_msg_size=protocol.MAX_MESSAGE_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self._goodbye_timeout),
                )
        except aiohttp.WSServerHandshakeError as error:
            if error.status in (401, 403):
                if self._config.management_token:
                    raise BalancerRefused(
                        f"it refused our token (HTTP {error.status}); "
                        "check --management-token on both sides"
                    ) from None
                raise BalancerRefused(
                    f"it requires a token (HTTP {error.status}); set --management-token"
                ) from None
            raise LinkLost(
                f"the balancer at {self._url} refused the WebSocket handshake: "
                f"HTTP {error.status} {error.message}"
            ) from None
        except aiohttp.ClientConnectorCertificateError as error:
            certificate_error = error.certificate_error
            reason = getattr(certificate_error, "verify_message", None) or str(certificate_error)
            ca_file = self._config.management_ca_file
            trusted = (
                f"--management-ca-file {ca_file}"
                if ca_file is not None
                else "the system's trust store (or give --management-ca-file)"
            )
            raise BalancerUntrusted(
                f"refusing the balancer at {self._url}: its TLS certificate is not trusted "
                f"({reason}); it must be signed by a CA of {trusted} and name the host "
                f"{self._balancers[self._current][0]}"
            ) from None
        except aiohttp.ClientConnectorSSLError as error:
            raise LinkLost(
                f"TLS with the balancer at {self._url} failed: "
                f"{getattr(error.os_error, 'reason', None) or error.os_error}; "
                "does its management port have --management-tls-cert?"
            ) from None
        except aiohttp.ClientConnectorError as error:
            reason = _os_reason(error.os_error)
            raise LinkLost(f"cannot connect to the balancer at {self._url}: {reason}") from None
        except TimeoutError:
            raise LinkLost(
                f"the balancer at {self._url} did not accept a WebSocket within "
                f"{self._handshake_timeout:g}s"
            ) from None

    def _registration(self, status: protocol.Status) -> protocol.Register:
        external = self._config.external
        scheme: Literal["http", "https"] = "https" if external.scheme == "https" else "http"
        return protocol.Register(
            name=self._config.name,
            scheme=scheme,
            host=external.host,
            port=external.port,
            status=status,
        )

    async def _await_registered(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        try:
            message = await ws.receive(timeout=self._handshake_timeout)
        except TimeoutError:
            raise LinkLost(
                f"the balancer at {self._url} did not answer our registration within "
                f"{self._handshake_timeout:g}s"
            ) from None
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise LinkLost(self._closed_reason(ws, "before answering our registration"))
        reply = protocol.parse_balancer_message(message.data)
        if isinstance(reply, protocol.Error):
            raise BalancerRefused(reply.message)
        return reply.agent_id

    async def _report(
        self, ws: aiohttp.ClientWebSocketResponse, version: int, shutdown: asyncio.Event
    ) -> None:
        """Send statuses until shutdown (then say goodbye) or until the socket fails (then raise)."""
        listener = asyncio.create_task(self._listen(ws), name="balancer listener")
        reporter = asyncio.create_task(self._send_statuses(ws, version), name="status reporter")
        stopping = asyncio.create_task(shutdown.wait(), name="shutdown")
        tasks = (listener, reporter, stopping)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if shutdown.is_set():
                reporter.cancel()
                await asyncio.wait((reporter,))
                # The listener keeps reading, so close() can complete the closing handshake.
                await self._say_goodbye(ws, deregister=True)
                return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in (listener, reporter):
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        raise LinkLost(self._closed_reason(ws, "while we were reporting"))

    async def _send_statuses(self, ws: aiohttp.ClientWebSocketResponse, version: int) -> None:
        interval = self._config.reporting_interval
        # The balancer applies at most STATUS_FRAMES_PER_SECOND frames from us; changes closer
        # together than that are sent as one, the newest (see paddler.balancer.management.frame_budget).
        gap = 1 / protocol.STATUS_FRAMES_PER_SECOND
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        while True:
            try:
                async with asyncio.timeout(interval):
                    version, status = await self._board.newer_than(version)
            except TimeoutError:
                version, status = self._board.current()
            if (early := sent_at + gap - loop.time()) > 0:
                await asyncio.sleep(early)
                version, status = self._board.current()
            await ws.send_str(protocol.encode(status))
            sent_at = loop.time()

    async def _listen(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Return when the socket closes; raise if the balancer says something unacceptable."""
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                reply = protocol.parse_balancer_message(message.data)
                if isinstance(reply, protocol.Error):
                    raise BalancerRefused(reply.message)
                logger.debug("the balancer sent %s while we were reporting", reply.type)
            elif message.type is aiohttp.WSMsgType.ERROR:
                return
            else:
                raise protocol.ProtocolError(f"unexpected {message.type.name} frame")

    async def _say_goodbye(self, ws: aiohttp.ClientWebSocketResponse, deregister: bool) -> None:
        if ws.closed:
            return
        try:
            async with asyncio.timeout(self._goodbye_timeout):
                if deregister:
                    await ws.send_str(protocol.encode(protocol.Deregister()))
                    logger.info("deregistered from the balancer at %s", self._url)
                await ws.close()
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            logger.debug("closing the balancer socket failed: %r", error)
            # The socket is gone or stuck either way; make sure its connection is released.
            await ws.close()

    def _registered(self, agent_id: str) -> None:
        self.agent_id = agent_id
        if self._outage is None:
            logger.info("registered with the balancer at %s as %s", self._url, agent_id)
        else:
            logger.info(
                "registered with the balancer at %s as %s again, after: %s",
                self._url,
                agent_id,
                self._outage,
            )
        self._outage = None
        self._outages.clear()  # an outage from now on is a new one, logged again

    def _report_outage(self, reason: str, refused: bool) -> None:
        self._outage = reason
        if reason == self._outages.get(self._current):
            logger.debug("still cannot link to the balancer: %s", reason)
            return
        self._outages[self._current] = reason
        level = logging.ERROR if refused else logging.WARNING
        logger.log(level, "%s; retrying until it works", reason)

    def _closed_reason(self, ws: aiohttp.ClientWebSocketResponse, when: str) -> str:
        detail = f" ({ws.exception()})" if ws.exception() else ""
        return f"the balancer at {self._url} closed the socket {when}: code {ws.close_code}{detail}"


def _os_reason(error: OSError) -> str:
    # asyncio's connect errors read "Connect call failed ('127.0.0.1', 8085)"; the errno is
    # what the operator needs.
    return os.strerror(error.errno) if error.errno else str(error)
