"""BalancerLink against a scripted balancer socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from paddler import protocol
from paddler.agent.balancer_link import BalancerLink
from paddler.agent.status_board import StatusBoard
from paddler.config import Address, AgentConfig
from paddler.protocol import LlamaCppState, Status
from tests.support.fake_balancer import running_fake_balancer
from tests.support.logs import watching

LINK_LOGGER = "paddler.agent.balancer_link"
IDLE = Status(state=LlamaCppState.OK, slots_idle=2, models=("tiny",))
BUSY = Status(state=LlamaCppState.OK, slots_idle=1, slots_processing=1, models=("tiny",))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def agent_config(management_port: int, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "local": Address("http", "127.0.0.1", 8088),
        "external": Address("http", "10.0.0.7", 9001),
        "management_port": management_port,
        "name": "agent-one",
        "reporting_interval": 30.0,
        "reconnect_backoff_max": 0.2,
    }
    settings.update(overrides)
    return AgentConfig(**settings)


def board_with(status: Status | None) -> StatusBoard:
    board = StatusBoard()
    if status is not None:
        board.publish(status)
    return board


@contextlib.asynccontextmanager
async def linked(config: AgentConfig, board: StatusBoard) -> AsyncIterator[asyncio.Event]:
    """Run a BalancerLink; on exit, shut it down and require that it finishes promptly."""
    shutdown = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(BalancerLink(config, session, board).run(shutdown))
        try:
            yield shutdown
        finally:
            shutdown.set()
            async with asyncio.timeout(5):
                await task


async def test_link_registers_first_with_its_name_address_status_and_token() -> None:
    """The first message is register, sent with the bearer token, the external address and
    the latest status."""
    async with running_fake_balancer() as balancer:
        config = agent_config(balancer.port, management_token="s3cret")
        async with linked(config, board_with(IDLE)):
            _, message = await balancer.next_message()
    assert message == protocol.Register(
        name="agent-one", scheme="http", host="10.0.0.7", port=9001, status=IDLE
    )
    assert balancer.connections[0].authorization == "Bearer s3cret"


async def test_link_sends_a_status_as_soon_as_it_changes() -> None:
    """A new status goes out at once, long before the reporting interval."""
    board = board_with(IDLE)
    async with running_fake_balancer() as balancer, linked(agent_config(balancer.port), board):
        await balancer.next_message()
        board.publish(IDLE)  # the same status again: nothing to send
        board.publish(BUSY)
        _, message = await balancer.next_message(timeout=2.0)
    assert message == BUSY


async def test_link_repeats_the_latest_status_every_reporting_interval() -> None:
    """Without changes, the latest status is sent again once per reporting interval."""
    async with running_fake_balancer() as balancer:
        config = agent_config(balancer.port, reporting_interval=0.05)
        async with linked(config, board_with(IDLE)):
            messages = [(await balancer.next_message())[1] for _ in range(4)]
    assert isinstance(messages[0], protocol.Register)
    assert messages[1:] == [IDLE, IDLE, IDLE]


async def test_link_registers_again_after_the_balancer_drops_the_socket() -> None:
    """When the balancer closes the socket, the link reconnects and registers anew."""
    board = board_with(IDLE)
    async with running_fake_balancer() as balancer, linked(agent_config(balancer.port), board):
        await balancer.next_message()
        board.publish(BUSY)
        await balancer.next_message()
        await balancer.drop_sockets()
        number, message = await balancer.next_message()
    assert number == 2
    assert message == protocol.Register(name="agent-one", host="10.0.0.7", port=9001, status=BUSY)


async def test_link_deregisters_and_closes_cleanly_on_shutdown() -> None:
    """Shutdown sends deregister, then a normal close, and run() returns."""
    async with running_fake_balancer() as balancer:
        async with linked(agent_config(balancer.port), board_with(IDLE)):
            await balancer.next_message()
        _, message = await balancer.next_message()
        assert message == protocol.Deregister()
        async with asyncio.timeout(5):
            await balancer.connections[0].closed.wait()
    assert balancer.connections[0].close_code == aiohttp.WSCloseCode.OK


async def test_link_waits_for_the_balancer_and_logs_the_outage_once() -> None:
    """Failed attempts are logged once per outage; the link registers once the balancer is up."""
    port = closed_port()
    with watching(LINK_LOGGER) as log:
        async with linked(agent_config(port), board_with(IDLE)):
            await log.wait_for(logging.DEBUG, count=2)  # three failed attempts so far
            async with running_fake_balancer(port) as balancer:
                _, message = await balancer.next_message()
                assert isinstance(message, protocol.Register)
                recovered = await log.wait_for(logging.INFO)
                warnings = log.messages(logging.WARNING)
    assert warnings == [
        f"cannot connect to the balancer at ws://127.0.0.1:{port}{protocol.AGENT_SOCKET_PATH}: "
        "Connection refused; retrying until it works"
    ]
    assert "again, after: cannot connect" in recovered[0]


async def test_link_reports_that_the_balancer_refused_our_token() -> None:
    """An HTTP 401 on the handshake is logged as a refused token, and retried."""
    with watching(LINK_LOGGER) as log:
        async with running_fake_balancer() as balancer:
            balancer.handshake_status = 401
            config = agent_config(balancer.port, management_token="wrong")
            async with linked(config, board_with(IDLE)):
                errors = await log.wait_for(logging.ERROR)
    assert "refused our token (HTTP 401)" in errors[0]


async def test_link_reports_the_message_of_a_refused_registration() -> None:
    """An error answer to register is logged with the balancer's own words."""
    with watching(LINK_LOGGER) as log:
        async with running_fake_balancer() as balancer:
            balancer.refusal = "the name agent-one is taken"
            async with linked(agent_config(balancer.port), board_with(IDLE)):
                errors = await log.wait_for(logging.ERROR)
    assert "refused us: the name agent-one is taken" in errors[0]


async def test_link_registers_with_the_first_status_published_after_it_started() -> None:
    """Started before any observation, the link waits for one and registers with it."""
    board = StatusBoard()
    async with running_fake_balancer() as balancer, linked(agent_config(balancer.port), board):
        board.publish(BUSY)
        _, message = await balancer.next_message()
    assert isinstance(message, protocol.Register)
    assert message.status == BUSY


async def test_link_never_sends_faster_than_the_balancers_frame_budget() -> None:
    """Changes every millisecond go out at most STATUS_FRAMES_PER_SECOND, the newest last."""
    board = board_with(IDLE)
    loop = asyncio.get_running_loop()
    async with running_fake_balancer() as balancer, linked(agent_config(balancer.port), board):
        await balancer.next_message()
        started = loop.time()
        changes = 0
        while loop.time() - started < 0.6:
            changes += 1
            board.publish(Status(state=LlamaCppState.OK, slots_idle=changes))
            await asyncio.sleep(0.001)
        elapsed = loop.time() - started
        newest = Status(state=LlamaCppState.OK, slots_idle=changes)
        while (await balancer.next_message())[1] != newest:
            pass
        statuses = balancer.connections[0].messages[1:]
    assert changes > 100
    assert len(statuses) <= protocol.STATUS_FRAMES_PER_SECOND * elapsed + 2
    assert statuses[-1] == newest


async def test_link_goes_to_the_next_balancer_when_the_one_it_reports_to_goes_away() -> None:
    """With two balancers, the agent links to the first; when that one stops, it registers with
    the second at once (no backoff), with its latest status."""
    board = board_with(IDLE)
    async with running_fake_balancer() as second, contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_fake_balancer())
        config = agent_config(
            first.port,
            management_addresses=(("127.0.0.1", first.port), ("127.0.0.1", second.port)),
        )
        async with linked(config, board):
            _, message = await first.next_message()
            assert isinstance(message, protocol.Register)
            board.publish(BUSY)
            await first.next_message()
            await stack.aclose()  # the first balancer is gone for good
            _, message = await second.next_message()
    assert message == protocol.Register(name="agent-one", host="10.0.0.7", port=9001, status=BUSY)


async def test_link_skips_a_balancer_that_is_down_and_stays_with_the_one_that_answered() -> None:
    """The first address refuses connections: the agent registers with the second, and stays
    there (a single connection) while that link holds."""
    dead = closed_port()
    async with running_fake_balancer() as alive:
        config = agent_config(
            dead, management_addresses=(("127.0.0.1", dead), ("127.0.0.1", alive.port))
        )
        async with linked(config, board_with(IDLE)):
            _, message = await alive.next_message()
            assert isinstance(message, protocol.Register)
            await asyncio.sleep(0.5)  # long enough for any wrongful reconnection to show
            assert len(alive.connections) == 1


async def test_link_waits_only_after_every_balancer_failed_and_logs_each_outage_once() -> None:
    """Two balancers down: each failure is logged once per balancer, the attempts alternate
    between them, and the link registers with whichever comes up."""
    ports = closed_port(), closed_port()
    config = agent_config(ports[0], management_addresses=tuple(("127.0.0.1", p) for p in ports))
    with watching(LINK_LOGGER) as log:
        async with linked(config, board_with(IDLE)):
            await log.wait_for(logging.DEBUG, count=4)  # both tried three times
            async with running_fake_balancer(ports[1]) as balancer:
                _, message = await balancer.next_message()
                assert isinstance(message, protocol.Register)
                warnings = log.messages(logging.WARNING)
    assert warnings == [
        f"cannot connect to the balancer at ws://127.0.0.1:{port}{protocol.AGENT_SOCKET_PATH}: "
        "Connection refused; retrying until it works"
        for port in ports
    ]
