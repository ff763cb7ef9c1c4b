"""Answers that are the request's own fault pass through, and never count against a server.

Fake upstreams here stand for servers in states real llama.cpp cannot be put in on demand (one
that fails every request with a 500, one that refuses connections); tests/e2e covers the same
rules against real llama.cpp.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.support.balancer import ScriptedAgent, ok, running_balancer
from tests.support.upstream import fake_upstream

pytestmark = pytest.mark.both_event_loops

_agents: list[ScriptedAgent] = []
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NO_EMBEDDINGS = {
    "error": {
        "code": 501,
        "message": "This server does not support embeddings. Start it with `--embeddings`",
        "type": "not_supported_error",
    }
}


def counting(hits: Counter[str], name: str, status: int, body: object) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        hits[name] += 1
        return web.json_response(body, status=status)

    return handle


def without_embeddings(hits: Counter[str], name: str) -> Handler:
    """llama.cpp started without --embeddings: 501 for embeddings, answers for the rest."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        hits[name] += 1
        if request.path == "/v1/embeddings":
            return web.json_response(NO_EMBEDDINGS, status=501)
        return web.json_response({"content": "hi"})

    return handle


async def register(
    session: aiohttp.ClientSession, management_url: str, name: str, port: int, idle: int
) -> None:
    agent = ScriptedAgent(session, management_url)
    _agents.append(agent)  # a collected agent's socket closes, which deregisters it
    await agent.register(name, port, ok(idle=idle))


async def register_departed(
    session: aiohttp.ClientSession, management_url: str, name: str, idle: int
) -> None:
    """A server the balancer verified, which then stopped listening: it refuses connections."""
    agent = ScriptedAgent(session, management_url)
    _agents.append(agent)
    await agent.register_departed(name, ok(idle=idle))


async def test_a_501_goes_to_a_server_that_offers_the_route_and_the_lack_is_remembered(
    session: aiohttp.ClientSession,
) -> None:
    """Embeddings reach the server started with --embeddings; the other is not blamed, and
    later embeddings go straight to the right server."""
    hits: Counter[str] = Counter()
    async with (
        fake_upstream(without_embeddings(hits, "plain")) as plain,
        fake_upstream(counting(hits, "embedder", 200, {"data": [{"embedding": [0.5]}]})) as emb,
        running_balancer() as running,
    ):
        await register(session, running.management_url, "plain", plain, idle=4)
        await register(session, running.management_url, "embedder", emb, idle=1)
        for _ in range(3):
            async with session.post(f"{running.proxy_url}/v1/embeddings", json={}) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == "embedder"
        assert hits == {"plain": 1, "embedder": 3}
        agents = {agent.name: agent for agent in running.pool.agents()}
        assert not agents["plain"].circuit_open
        assert agents["plain"].consecutive_failures == 0
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            assert response.headers["X-Paddler-Agent"] == "plain"


async def test_a_501_from_every_server_reaches_the_client_unchanged(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody offers the route: the client gets llama.cpp's 501 and its advice, at once, and
    the request log does not count it as a failure of the fleet."""
    caplog.set_level(logging.INFO, logger="paddler.requests")
    hits: Counter[str] = Counter()
    async with (
        fake_upstream(counting(hits, "a", 501, NO_EMBEDDINGS)) as port_a,
        fake_upstream(counting(hits, "b", 501, NO_EMBEDDINGS)) as port_b,
        running_balancer() as running,
    ):
        await register(session, running.management_url, "a", port_a, idle=1)
        await register(session, running.management_url, "b", port_b, idle=1)
        for _ in range(4):
            async with session.post(f"{running.proxy_url}/v1/embeddings", json={}) as response:
                assert response.status == 501
                assert await response.json() == NO_EMBEDDINGS
        assert hits["a"] + hits["b"] == 5  # learning costs one retry, then one attempt each
        assert all(agent.usable() for agent in running.pool.agents())
        assert all(agent.consecutive_failures == 0 for agent in running.pool.agents())
    lines = [record for record in caplog.records if record.name == "paddler.requests"]
    assert len(lines) == 4
    assert all(line.levelno == logging.INFO for line in lines)
    assert all(line.fault == "request" for line in lines)  # type: ignore[attr-defined]
    assert "(the request's own fault)" in lines[0].getMessage()


async def test_a_4xx_is_relayed_unchanged_and_never_sent_to_another_server(
    session: aiohttp.ClientSession,
) -> None:
    """A context overflow is the same on every server: one attempt, llama.cpp's own answer."""
    overflow = {
        "error": {
            "code": 400,
            "message": "request (3002 tokens) exceeds the available context size (256 tokens)",
            "type": "exceed_context_size_error",
        }
    }
    hits: Counter[str] = Counter()
    async with (
        fake_upstream(counting(hits, "a", 400, overflow)) as port_a,
        fake_upstream(counting(hits, "b", 400, overflow)) as port_b,
        running_balancer() as running,
    ):
        await register(session, running.management_url, "a", port_a, idle=2)
        await register(session, running.management_url, "b", port_b, idle=1)
        for _ in range(5):
            async with session.post(f"{running.proxy_url}/completion", json={}) as response:
                assert response.status == 400
                assert await response.json() == overflow
        assert sum(hits.values()) == 5
        assert all(agent.usable() for agent in running.pool.agents())


async def test_a_500_that_another_server_serves_counts_against_the_first(
    session: aiohttp.ClientSession,
) -> None:
    """A server failing requests that succeed elsewhere is the one evidence a 500 can give;
    the client only sees the success, and repeated failures open that server's circuit."""
    hits: Counter[str] = Counter()
    broken_body = {"error": {"code": 500, "message": "CUDA error", "type": "server_error"}}
    async with (
        fake_upstream(counting(hits, "broken", 500, broken_body)) as broken,
        fake_upstream(counting(hits, "healthy", 200, {"content": "hi"})) as healthy,
        running_balancer(circuit_breaker_failure_threshold=3) as running,
    ):
        await register(session, running.management_url, "broken", broken, idle=8)
        await register(session, running.management_url, "healthy", healthy, idle=1)
        agents = {agent.name: agent for agent in running.pool.agents()}
        for expected_failures in (1, 2):
            async with session.post(f"{running.proxy_url}/completion", json={}) as response:
                assert response.status == 200
                assert response.headers["X-Paddler-Agent"] == "healthy"
            assert agents["broken"].consecutive_failures == expected_failures
            assert not agents["broken"].circuit_open
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            assert response.status == 200
        assert agents["broken"].circuit_open
        assert agents["healthy"].consecutive_failures == 0


async def test_when_no_server_answers_the_client_is_told_what_happened_on_each(
    session: aiohttp.ClientSession,
) -> None:
    """One server refuses connections and one is loading: the 502 names both causes."""
    hits: Counter[str] = Counter()
    loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    async with (
        fake_upstream(counting(hits, "loading", 503, loading)) as loading_port,
        running_balancer(max_retries=1) as running,
    ):
        await register_departed(session, running.management_url, "refusing", idle=2)
        await register(session, running.management_url, "loading", loading_port, idle=1)
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            assert response.status == 502
            error = (await response.json())["error"]
        assert error["type"] == "server_error"
        assert "refusing: cannot connect" in error["message"]
        assert "loading: answered 503: Loading model" in error["message"]


async def test_llamacpps_own_answer_is_preferred_to_a_summary_of_failures(
    session: aiohttp.ClientSession,
) -> None:
    """A 500 kept from one server beats "unreachable" from the next: it says what is wrong."""
    hits: Counter[str] = Counter()
    failing = {"error": {"code": 500, "message": "template failed", "type": "server_error"}}
    async with (
        fake_upstream(counting(hits, "failing", 500, failing)) as failing_port,
        running_balancer(max_retries=1) as running,
    ):
        await register(session, running.management_url, "failing", failing_port, idle=2)
        await register_departed(session, running.management_url, "refusing", idle=1)
        async with session.post(f"{running.proxy_url}/completion", json={}) as response:
            assert response.status == 500
            assert await response.json() == failing
            assert response.headers["X-Paddler-Agent"] == "failing"
        agents = {agent.name: agent for agent in running.pool.agents()}
        assert agents["failing"].consecutive_failures == 0
        assert agents["refusing"].circuit_open
