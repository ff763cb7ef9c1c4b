"""The proxy port against fake upstreams: the faults real llama.cpp cannot produce on demand."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from paddler.balancer.routing.policies import Demand
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.upstream import closing_keepalive_upstream, fake_upstream

pytestmark = pytest.mark.both_event_loops

_agents: list[ScriptedAgent] = []


def keep(agent: ScriptedAgent) -> ScriptedAgent:
    """Hold a reference: a collected agent's socket closes, which deregisters it."""
    _agents.append(agent)
    return agent


async def echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
        },
        headers={"X-Upstream": "echo", "Keep-Alive": "timeout=5, max=100"},
    )


async def test_a_refused_connection_is_retried_on_another_agent(
    session: aiohttp.ClientSession,
) -> None:
    """A server that refuses connections is skipped; the client only sees the success."""
    async with fake_upstream(echo) as good_port, running_balancer() as running:
        dead = ScriptedAgent(session, running.management_url)
        await dead.register_departed("dead", ok(idle=4))
        good = ScriptedAgent(session, running.management_url)
        await good.register("good", good_port, ok(idle=1))
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 200
            assert (await response.json())["path"] == "/completion"
        agents = {agent["name"]: agent for agent in await running.agents(session)}
        assert agents["dead"]["circuit_open"] is True
        assert agents["good"]["slots_idle"] == 1


async def test_a_5xx_before_any_byte_is_retried_elsewhere(session: aiohttp.ClientSession) -> None:
    """An agent answering 503 is taken out of rotation and the request goes to another."""

    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)

    async with (
        fake_upstream(unavailable) as bad_port,
        fake_upstream(echo) as good_port,
        running_balancer() as running,
    ):
        await keep(ScriptedAgent(session, running.management_url)).register(
            "bad", bad_port, ok(idle=3)
        )
        await keep(ScriptedAgent(session, running.management_url)).register(
            "good", good_port, ok(idle=1)
        )
        async with session.post(f"{running.proxy_url}/v1/chat/completions", data=b"{}") as response:
            assert response.status == 200
        assert running.pool.pick(Demand(True)).name == "good"


async def test_every_agent_failing_returns_the_upstream_error(
    session: aiohttp.ClientSession,
) -> None:
    """When every server fails, the client gets a 5xx with an OpenAI-shaped body, not a hang."""

    async with running_balancer(max_retries=1) as running:
        await keep(ScriptedAgent(session, running.management_url)).register_departed(
            "a", ok(idle=1)
        )
        await keep(ScriptedAgent(session, running.management_url)).register_departed(
            "b", ok(idle=1)
        )
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 502
            body = await response.json()
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == 502
        assert all(agent.reserved == 0 for agent in running.pool.agents())


async def test_upstream_death_mid_stream_ends_the_stream_cleanly_with_an_error(
    session: aiohttp.ClientSession,
) -> None:
    """The client gets the events sent so far, an error event and a well-formed end."""

    async def dying_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await response.write(b'data: {"n": 2}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async with fake_upstream(dying_stream) as port, running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "dying", port, ok(idle=1)
        )
        async with session.post(f"{running.proxy_url}/v1/chat/completions", data=b"{}") as response:
            assert response.status == 200
            text = (await response.read()).decode()
        events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: ")]
        assert events[:2] == [{"n": 1}, {"n": 2}]
        assert events[2]["error"]["type"] == "server_error"
        agent = running.pool.agents()[0]
        assert agent.reserved == 0
        assert agent.in_flight == 0


async def test_a_pooled_connection_closed_by_the_server_never_reaches_the_client(
    session: aiohttp.ClientSession,
) -> None:
    """llama.cpp closing a keep-alive connection between requests is invisible to clients."""
    async with closing_keepalive_upstream() as (port, counts), running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "closer", port, ok(idle=2)
        )
        for number in range(30):
            async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
                assert response.status == 200, number
                assert await response.json() == {"ok": True}
        assert counts["answered"] == 30
        assert counts["dropped"] > 0  # the fault did happen, and no client saw it


async def test_requests_pass_through_unchanged_minus_hop_by_hop_headers(
    session: aiohttp.ClientSession,
) -> None:
    """Method, path, query, headers and body arrive as sent; hop-by-hop headers do not."""
    async with fake_upstream(echo) as port, running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "echo", port, ok(idle=1)
        )
        async with session.put(
            URL(f"{running.proxy_url}/slots/0?action=save&x=%2F1", encoded=True),
            data=b"payload",
            headers={
                "Authorization": "Bearer llama-key",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Dropped",
                "X-Dropped": "gone",
                "Proxy-Authorization": "secret",
            },
        ) as response:
            assert response.status == 200
            assert response.headers["X-Upstream"] == "echo"
            assert "Keep-Alive" not in response.headers
            seen = await response.json()
        assert seen["method"] == "PUT"
        assert seen["path"] == "/slots/0?action=save&x=%2F1"
        assert seen["body"] == "payload"
        assert seen["headers"]["Authorization"] == "Bearer llama-key"
        assert seen["headers"]["X-Custom"] == "kept"
        assert "X-Dropped" not in seen["headers"]
        assert "Proxy-Authorization" not in seen["headers"]
        assert seen["headers"]["Host"] == running.proxy_url.removeprefix("http://")


async def test_a_whole_answer_and_one_still_arriving_reach_the_client_alike(
    session: aiohttp.ClientSession,
) -> None:
    """An answer whose body came with its head goes out in one write, one whose body is still
    arriving goes out piece by piece: the client gets the same status, head and body."""
    body = b'{"content": "hi", "stop": true}'
    headers = {"Content-Type": "application/json", "X-Upstream": "kept"}

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/whole":
            return web.Response(status=201, body=body, headers=headers)
        response = web.StreamResponse(status=201, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)  # the head leaves first, the body after it
        for start in range(0, len(body), 8):
            await response.write(body[start : start + 8])
        await response.write_eof()
        return response

    async with fake_upstream(answer) as port, running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register("u", port, ok(idle=1))
        seen = []
        for path in ("/whole", "/pieces"):
            async with session.post(f"{running.proxy_url}{path}", data=b"{}") as response:
                head = {
                    name: value
                    for name, value in response.headers.items()
                    if name.lower() not in ("date", "x-request-id")
                }
                seen.append((response.status, head, await response.read()))
    assert seen[0] == seen[1]
    status, head, received = seen[0]
    assert (status, received) == (201, body)
    assert head["Content-Length"] == str(len(body))
    assert head["X-Upstream"] == "kept"
    assert head["X-Paddler-Agent"] == "u"


async def test_rewrite_host_header_sends_the_agent_address(session: aiohttp.ClientSession) -> None:
    """--rewrite-host-header replaces the client's Host with the agent's external host."""
    async with fake_upstream(echo) as port, running_balancer(rewrite_host_header=True) as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "echo", port, ok(idle=1)
        )
        async with session.get(f"{running.proxy_url}/slots") as response:
            seen = await response.json()
        assert seen["headers"]["Host"] == f"127.0.0.1:{port}"


async def test_an_oversized_body_gets_413_in_the_openai_shape(
    session: aiohttp.ClientSession,
) -> None:
    """A body beyond the limit is refused with 413 and never reaches a server."""
    async with fake_upstream(echo) as port, running_balancer(max_request_body_size=1024) as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "echo", port, ok(idle=1)
        )
        async with session.post(f"{running.proxy_url}/completion", data=b"x" * 4096) as response:
            assert response.status == 413
            body = await response.json()
        assert body["error"]["type"] == "invalid_request_error"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"x" * 512

        async with session.post(f"{running.proxy_url}/completion", data=chunks()) as response:
            assert response.status == 413
        assert running.pool.agents()[0].in_flight == 0


async def test_a_full_buffer_answers_503_with_retry_after(session: aiohttp.ClientSession) -> None:
    """With every slot busy and the buffer full, a request is refused at once."""
    async with running_balancer(request_buffer_size=0) as running:
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            body = await response.json()
        assert body["error"] == {
            "code": 503,
            "message": "the request buffer is full (0 requests waiting)",
            "type": "unavailable_error",
        }


async def test_a_buffered_request_times_out_with_504(session: aiohttp.ClientSession) -> None:
    """A request that waits past --request-buffer-timeout gets 504."""
    async with running_balancer(request_buffer_timeout=0.2) as running:
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 504
            assert (await response.json())["error"]["code"] == 504
        assert running.balancer.buffer.waiting == 0


async def test_a_buffered_request_is_served_when_an_agent_joins(
    session: aiohttp.ClientSession,
) -> None:
    """Scale from zero: a request waits while no agent exists and is served by the first one."""
    async with fake_upstream(echo) as port, running_balancer() as running:
        request = asyncio.create_task(session.post(f"{running.proxy_url}/completion", data=b"{}"))
        await wait_until(lambda: running.balancer.buffer.waiting == 1)
        await keep(ScriptedAgent(session, running.management_url)).register(
            "late", port, ok(idle=1)
        )
        response = await request
        assert response.status == 200
        response.release()


async def test_a_client_leaving_the_buffer_is_dropped_at_once(
    session: aiohttp.ClientSession,
) -> None:
    """A buffered request whose client disconnects no longer holds a place in the buffer."""
    async with running_balancer() as running:
        request = asyncio.create_task(session.post(f"{running.proxy_url}/completion", data=b"{}"))
        await wait_until(lambda: running.balancer.buffer.waiting == 1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        await wait_until(lambda: running.balancer.buffer.waiting == 0, timeout=2)


async def test_health_reports_the_aggregate_and_503_without_usable_agents(
    session: aiohttp.ClientSession,
) -> None:
    """GET /health sums slots, and answers 503 while nothing can serve."""
    async with fake_upstream(echo) as port, running_balancer() as running:
        async with session.get(f"{running.proxy_url}/health") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "no_usable_agents"
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("a", port, ok(idle=3, processing=1))
        async with session.get(f"{running.proxy_url}/health") as response:
            assert response.status == 200
            body = await response.json()
        assert body == {
            "status": "ok",
            "slots_idle": 3,
            "slots_processing": 1,
            "requests_buffered": 0,
        }


async def test_shutdown_answers_buffered_requests_and_drains_running_ones(
    session: aiohttp.ClientSession,
) -> None:
    """On shutdown, buffered requests get 503 while a running one completes."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"done": True})

    async with fake_upstream(slow) as port:
        async with running_balancer() as running:
            await keep(ScriptedAgent(session, running.management_url)).register(
                "slow", port, ok(idle=1)
            )
            running_request = asyncio.create_task(
                session.post(f"{running.proxy_url}/completion", data=b"{}")
            )
            await wait_until(lambda: running.pool.agents()[0].reserved == 1)
            buffered = asyncio.create_task(
                session.post(f"{running.proxy_url}/completion", data=b"{}")
            )
            await wait_until(lambda: running.balancer.buffer.waiting == 1)
            asyncio.get_running_loop().call_later(0.3, release.set)
            # leaving the block shuts the balancer down
        buffered_response = await buffered
        assert buffered_response.status == 503
        finished = await running_request
        assert finished.status == 200
        assert await finished.json() == {"done": True}


async def test_server_sent_events_are_forwarded_as_they_arrive(
    session: aiohttp.ClientSession,
) -> None:
    """Each event reaches the client while the server is still generating the next one."""
    proceed = asyncio.Event()

    async def stepwise(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await proceed.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with fake_upstream(stepwise) as port, running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register("sse", port, ok(idle=1))
        async with session.post(f"{running.proxy_url}/v1/chat/completions", data=b"{}") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            assert first == b'data: {"n": 1}\n\n'
            proceed.set()
            assert await response.content.read() == b"data: [DONE]\n\n"


async def test_request_bodies_held_at_once_are_bounded(session: aiohttp.ClientSession) -> None:
    """Bodies in memory across all requests are capped: beyond the budget, 503 at once."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"done": True})

    async with (
        fake_upstream(slow) as port,
        running_balancer(request_body_memory=3000, max_request_body_size=2000) as running,
    ):
        await keep(ScriptedAgent(session, running.management_url)).register(
            "slow", port, ok(idle=4)
        )
        first = asyncio.create_task(
            session.post(f"{running.proxy_url}/completion", data=b"x" * 2000)
        )
        await wait_until(lambda: running.pool.agents()[0].reserved == 1)
        async with session.post(f"{running.proxy_url}/completion", data=b"y" * 1500) as refused:
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "1"
            assert "request bodies" in (await refused.json())["error"]["message"]
        release.set()
        async with await first as response:
            assert response.status == 200
        async with session.post(f"{running.proxy_url}/completion", data=b"y" * 1500) as later:
            assert later.status == 200


async def test_a_poisonous_request_does_not_empty_the_fleet(
    session: aiohttp.ClientSession,
) -> None:
    """A request every server answers with 500 gets the server's own 500, and it counts
    against no server: two servers failing it is evidence against the request."""

    async def internal_error(request: web.Request) -> web.Response:
        body = {"error": {"code": 500, "message": "template failed", "type": "server_error"}}
        return web.json_response(body, status=500)

    async with (
        fake_upstream(internal_error) as port_a,
        fake_upstream(internal_error) as port_b,
        running_balancer(max_retries=1) as running,
    ):
        for name, port in (("a", port_a), ("b", port_b)):
            await keep(ScriptedAgent(session, running.management_url)).register(
                name, port, ok(idle=1)
            )
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 500
            assert (await response.json())["error"]["message"] == "template failed"
        assert not any(agent.circuit_open for agent in running.pool.agents())
        assert [agent.consecutive_failures for agent in running.pool.agents()] == [0, 0]


async def test_each_request_is_logged_with_its_id_agent_wait_and_outcome(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """One log line per request names it, the agent, the buffer wait and the outcome."""
    caplog.set_level(logging.INFO, logger="paddler.requests")
    async with fake_upstream(echo) as port, running_balancer() as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "echo", port, ok(idle=1)
        )
        async with session.post(
            f"{running.proxy_url}/completion", data=b"{}", headers={"X-Request-Id": "req-42"}
        ) as response:
            assert response.status == 200
            assert response.headers["X-Request-Id"] == "req-42"
            assert response.headers["X-Paddler-Agent"] == "echo"
        (line,) = [record for record in caplog.records if record.name == "paddler.requests"]
        assert line.request_id == "req-42"  # type: ignore[attr-defined]
        assert line.agent == "echo"  # type: ignore[attr-defined]
        assert line.outcome == "completed"  # type: ignore[attr-defined]
        assert line.status == 200  # type: ignore[attr-defined]
        assert line.buffer_wait_ms >= 0  # type: ignore[attr-defined]
        assert "req-42" in line.getMessage()


async def test_the_agent_header_can_be_switched_off(session: aiohttp.ClientSession) -> None:
    """--no-agent-header keeps the serving agent's name out of responses."""
    async with fake_upstream(echo) as port, running_balancer(agent_header=False) as running:
        await keep(ScriptedAgent(session, running.management_url)).register(
            "echo", port, ok(idle=1)
        )
        async with session.get(f"{running.proxy_url}/slots") as response:
            assert response.status == 200
            assert "X-Paddler-Agent" not in response.headers
            assert "X-Request-Id" in response.headers


async def test_refusals_are_logged_with_their_outcome(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A request refused by a full buffer is logged as a warning with outcome buffer_full."""
    caplog.set_level(logging.INFO, logger="paddler.requests")
    async with running_balancer(request_buffer_size=0) as running:
        async with session.post(f"{running.proxy_url}/completion", data=b"{}") as response:
            assert response.status == 503
        (line,) = [record for record in caplog.records if record.name == "paddler.requests"]
        assert line.levelno == logging.WARNING
        assert line.outcome == "buffer_full"  # type: ignore[attr-defined]
        assert line.agent is None  # type: ignore[attr-defined]
