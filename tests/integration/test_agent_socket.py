"""The agents' socket refuses what it cannot trust, with a reason, and keeps serving the rest."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import WSMsgType

from paddler import protocol
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import fake_upstream, not_found

pytestmark = pytest.mark.both_event_loops

TOKEN = "socket-secret"


async def refusal(socket: aiohttp.ClientWebSocketResponse) -> tuple[str, int | None]:
    """The error message the balancer sent, and the close code that followed."""
    reply = protocol.parse_balancer_message(await socket.receive_str())
    assert isinstance(reply, protocol.Error)
    closing = await socket.receive()
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    return reply.message, socket.close_code


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        ("{not json", "Invalid JSON"),
        (json.dumps({"v": 1, "type": "status", "state": "ok"}), "first message must be register"),
        (
            json.dumps(
                {"v": 1, "type": "register", "name": "a", "host": "h", "port": 1, "status": {}}
            ),
            "status.state",
        ),
        (
            json.dumps(
                {
                    "v": 1,
                    "type": "register",
                    "name": "a",
                    "host": "h",
                    "port": 1,
                    "status": {"state": "ok"},
                    "admin": True,
                }
            ),
            "admin",
        ),
    ],
)
async def test_a_malformed_first_message_is_refused_with_the_reason(
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    frame: str,
    complaint: str,
) -> None:
    """Bad JSON, a wrong first message, missing or unknown fields: error, close 1008, a log line."""
    caplog.set_level(logging.WARNING, logger="paddler")
    async with running_balancer(management_token=TOKEN) as running:
        socket = await session.ws_connect(
            running.management_url + protocol.AGENT_SOCKET_PATH,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        await socket.send_str(frame)
        message, code = await refusal(socket)
        assert complaint in message
        assert code == 1008
        assert complaint in caplog.text
        assert running.pool.agents() == []


async def test_a_malformed_report_ends_the_agent_session(session: aiohttp.ClientSession) -> None:
    """A registered agent that sends a bad report is refused and removed from the fleet."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=2))
        assert agent.socket is not None
        await agent.socket.send_str(
            json.dumps({"type": "status", "state": "ok", "slots_idle": "2"})
        )
        message, code = await refusal(agent.socket)
        assert "slots_idle" in message
        assert code == 1008
        await wait_until(lambda: running.pool.agents() == [])


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c29ja2V0LXNlY3JldA==", "Bearer"])
async def test_a_missing_or_wrong_token_gets_401_before_the_upgrade(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, header: str | None
) -> None:
    """Without the right Bearer token there is no socket at all, and the refusal is logged."""
    caplog.set_level(logging.WARNING, logger="paddler")
    async with running_balancer(management_token=TOKEN) as running:
        headers = {"Authorization": header} if header else {}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                running.management_url + protocol.AGENT_SOCKET_PATH, headers=headers
            )
        assert refused.value.status == 401
        assert "missing or wrong token" in caplog.text


async def test_reports_update_the_fleet_and_deregister_removes(
    session: aiohttp.ClientSession,
) -> None:
    """Register, report and deregister are reflected in the fleet at once."""
    async with fake_upstream(not_found) as port, running_balancer() as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=2))
        await agent.report(ok(idle=1, processing=1))
        await wait_until(lambda: running.pool.agents()[0].status.slots_processing == 1)
        listed = await running.agents(session)
        assert listed[0]["slots_idle"] == 1
        assert listed[0]["slots_processing"] == 1
        assert listed[0]["url"] == f"http://127.0.0.1:{port}"
        await agent.report_raw(protocol.encode(protocol.Deregister()))
        await wait_until(lambda: running.pool.agents() == [])
        await agent.close()


async def test_an_agent_list_never_shows_secrets(session: aiohttp.ClientSession) -> None:
    """The management API shows no token."""
    async with running_balancer(management_token=TOKEN) as running:
        agent = ScriptedAgent(session, running.management_url, token=TOKEN)
        await agent.register("a", 9, ok(idle=2), verified=False)
        async with session.get(f"{running.management_url}/api/v1/agents") as response:
            assert TOKEN not in await response.text()


async def test_the_socket_of_an_agent_removed_for_silence_is_closed(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent that stops reporting is removed, and then its connection is let go."""
    caplog.set_level(logging.INFO, logger="paddler.balancer.management.agent_socket")
    async with running_balancer(agent_stale_after=0.5) as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("silent", 9, ok(idle=2), verified=False)
        assert agent.socket is not None
        async with asyncio.timeout(10):
            ending = await agent.socket.receive()
        assert ending.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert running.pool.agents() == []
        assert "closing the socket of agent silent" in caplog.text


async def test_a_socket_whose_agent_registered_again_elsewhere_is_closed(
    session: aiohttp.ClientSession,
) -> None:
    """A newer registration at the same address takes the agent over; the old socket goes."""
    async with running_balancer(agent_stale_after=0.5) as running:
        old = ScriptedAgent(session, running.management_url)
        await old.register("a", 9, ok(idle=2), verified=False)
        new = ScriptedAgent(session, running.management_url)
        await new.register("a", 9, ok(idle=2), verified=False)
        assert old.socket is not None and new.socket is not None

        async def keep_reporting() -> None:
            while True:
                await new.report(ok(idle=2))
                await asyncio.sleep(0.1)

        reporting = asyncio.create_task(keep_reporting())
        async with asyncio.timeout(10):
            ending = await old.socket.receive()
        assert ending.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert not new.socket.closed
        assert [agent.name for agent in running.pool.agents()] == ["a"]
        reporting.cancel()
        await asyncio.gather(reporting, return_exceptions=True)
        await new.close()


async def test_a_report_repeated_unchanged_still_counts_as_a_report(
    session: aiohttp.ClientSession,
) -> None:
    """An idle agent sends the same frame again and again: each keeps it alive, and a change
    after them is applied."""
    async with running_balancer(agent_stale_after=0.5) as running:
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("idle", 9, ok(idle=2), verified=False)
        [controller] = running.pool.agents()
        for _ in range(12):  # 1.2 s of reports, more than twice --agent-stale-after
            reported_at = controller.last_report_at
            await agent.report(ok(idle=2))
            await wait_until(lambda at=reported_at: controller.last_report_at > at)
            await asyncio.sleep(0.1)
        assert running.pool.agents() == [controller]
        await agent.report(ok(idle=1, processing=1))
        await wait_until(lambda: controller.status.slots_processing == 1)
        await agent.close()
