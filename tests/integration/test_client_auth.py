"""Client keys on the proxy port, in process: which headers reach llama.cpp, and what a refused
request costs (nothing: no slot, no buffer place, no upstream request).

The upstream here is a fake only because it must show the headers it received, which a real
llama.cpp cannot; the real one is in tests/e2e/test_client_keys_over_tls.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.support.balancer import ScriptedAgent, ok, running_balancer
from tests.support.logs import watching
from tests.support.upstream import Handler, fake_upstream

pytestmark = pytest.mark.both_event_loops

CLIENT_KEY = "sk-client-key-42"
_agents: list[ScriptedAgent] = []


@pytest.fixture
async def seen() -> AsyncIterator[list[web.Request]]:
    _agents.clear()
    yield []
    for agent in _agents:
        await agent.close()


async def registered(session: aiohttp.ClientSession, management_url: str, port: int) -> None:
    agent = ScriptedAgent(session, management_url)
    _agents.append(agent)  # a collected agent's socket closes, which deregisters it
    await agent.register("echo", port, ok(idle=1))


def recording(seen: list[web.Request]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"ok": True})

    return handler


async def test_with_client_keys_the_clients_key_never_reaches_llamacpp(
    session: aiohttp.ClientSession, seen: list[web.Request]
) -> None:
    """Neither Authorization nor X-Api-Key is forwarded once the balancer checks keys."""
    async with (
        fake_upstream(recording(seen)) as port,
        running_balancer(api_keys=(CLIENT_KEY,)) as running,
    ):
        await registered(session, running.management_url, port)
        for header in ("Authorization", "X-Api-Key"):
            value = f"Bearer {CLIENT_KEY}" if header == "Authorization" else CLIENT_KEY
            async with session.post(
                f"{running.proxy_url}/completion", data=b"{}", headers={header: value}
            ) as response:
                assert response.status == 200
    assert len(seen) == 2
    for request in seen:
        assert "Authorization" not in request.headers
        assert "X-Api-Key" not in request.headers


async def test_the_llamacpp_key_replaces_whatever_key_the_client_sent(
    session: aiohttp.ClientSession, seen: list[web.Request]
) -> None:
    """With --llamacpp-api-key, llama.cpp gets that key as a Bearer token, and only it."""
    async with (
        fake_upstream(recording(seen)) as port,
        running_balancer(llamacpp_api_key="sk-llamacpp") as running,
    ):
        await registered(session, running.management_url, port)
        async with session.post(
            f"{running.proxy_url}/completion",
            data=b"{}",
            headers={"Authorization": "Bearer sk-user", "X-Api-Key": "sk-user"},
        ) as response:
            assert response.status == 200
    (request,) = seen
    assert request.headers.getall("Authorization") == ["Bearer sk-llamacpp"]
    assert "X-Api-Key" not in request.headers


async def test_without_any_key_configured_the_clients_authorization_is_passed_through(
    session: aiohttp.ClientSession, seen: list[web.Request]
) -> None:
    """The balancer without keys is transparent, as before: llama.cpp checks its own key."""
    async with fake_upstream(recording(seen)) as port, running_balancer() as running:
        await registered(session, running.management_url, port)
        async with session.post(
            f"{running.proxy_url}/completion",
            data=b"{}",
            headers={"Authorization": "Bearer sk-user"},
        ) as response:
            assert response.status == 200
    assert seen[0].headers["Authorization"] == "Bearer sk-user"


async def test_a_refused_request_takes_no_slot_no_buffer_place_and_never_logs_the_key(
    session: aiohttp.ClientSession, seen: list[web.Request]
) -> None:
    """401 at once: the agent's slot stays idle, nothing waits, nothing reaches llama.cpp, and
    the log line says how the key came without saying what it was."""
    async with (
        fake_upstream(recording(seen)) as port,
        running_balancer(api_keys=(CLIENT_KEY,)) as running,
    ):
        await registered(session, running.management_url, port)
        with watching("paddler.requests") as log:
            async with session.post(
                f"{running.proxy_url}/v1/chat/completions",
                data=b"{}",
                headers={"Authorization": "Bearer sk-wrong-secret", "X-Request-Id": "req-1"},
            ) as response:
                assert response.status == 401
                assert response.headers["X-Request-Id"] == "req-1"
                body = await response.json()
            (agent,) = running.pool.agents()
            assert (agent.free_slots(), agent.reserved, running.balancer.buffer.waiting) == (
                1,
                0,
                0,
            )
    assert body["error"]["type"] == "authentication_error"
    assert seen == []
    (entry,) = log.records
    assert entry.levelno == logging.WARNING
    assert entry.getMessage() == (
        "request req-1 POST /v1/chat/completions -> 401: a wrong key in Authorization"
    )
    assert "sk-wrong-secret" not in repr(entry.__dict__)


async def test_health_and_cors_preflights_need_no_key_and_model_listing_does(
    session: aiohttp.ClientSession, seen: list[web.Request]
) -> None:
    """As llama.cpp: /health and OPTIONS are public, /v1/models is not."""
    async with (
        fake_upstream(recording(seen)) as port,
        running_balancer(api_keys=(CLIENT_KEY,)) as running,
    ):
        await registered(session, running.management_url, port)
        async with session.get(f"{running.proxy_url}/health") as health:
            assert health.status == 200
        async with session.options(f"{running.proxy_url}/v1/chat/completions") as preflight:
            assert preflight.status == 200
        async with session.get(f"{running.proxy_url}/v1/models") as models:
            assert models.status == 401
        async with session.get(
            f"{running.proxy_url}/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as models:
            assert models.status == 200
    assert [request.method for request in seen] == ["OPTIONS"]


async def test_refused_requests_are_counted_in_prometheus_by_route(
    session: aiohttp.ClientSession,
) -> None:
    """Each 401 is a paddler_requests_total sample with outcome="unauthorized", so that a
    client with a stale key shows on a dashboard, not only in the log."""
    async with running_balancer(api_keys=(CLIENT_KEY,)) as running:
        for _ in range(2):
            async with session.post(f"{running.proxy_url}/v1/chat/completions", data=b"{}") as r:
                assert r.status == 401
        async with session.get(f"{running.management_url}/metrics") as response:
            text = await response.text()
    assert (
        'paddler_requests_total{outcome="unauthorized",route="/v1/chat/completions",'
        'status="401"} 2.0'
    ) in text
