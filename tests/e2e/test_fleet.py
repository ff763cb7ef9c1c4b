"""End to end: real llama.cpp servers, real ``paddler agent`` processes, the balancer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support.agent import running_agent
from tests.support.balancer import running_balancer, wait_until
from tests.support.fleet import Fleet
from tests.support.fleet import fleet as shared_fleet
from tests.support.llamacpp import running_llamacpp
from tests.support.metrics import llamacpp_metrics, tokens_predicted, watching_llamacpp

TOKEN = "e2e-secret-token"


@contextlib.asynccontextmanager
async def fleet(
    count: int, *, slots: int = 2, model: Path | None = None, **balancer_options: object
) -> AsyncIterator[Fleet]:
    """``count`` llama.cpp servers with an agent each, behind one balancer; all ready."""
    async with shared_fleet(
        count, slots=slots, model=model, token=TOKEN, **balancer_options
    ) as cluster:
        yield cluster


async def test_the_openai_sdk_works_through_the_balancer(session: aiohttp.ClientSession) -> None:
    """Chat and completions, streaming and not, through the official SDK."""
    async with fleet(2) as cluster:
        client = openai.AsyncOpenAI(base_url=f"{cluster.balancer.proxy_url}/v1", api_key="unused")
        models = await client.models.list()
        assert len(models.data) == 1
        model = models.data[0].id
        chat = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 8
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) >= 1
        completion = await client.completions.create(
            model=model, prompt="Once upon", max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert completion.choices[0].finish_reason == "length"
        await client.close()


async def test_three_times_more_requests_than_slots_never_queue_inside_llamacpp(
    session: aiohttp.ClientSession,
) -> None:
    """Under 3x oversubscription across 2 servers, requests_deferred stays 0 everywhere."""
    async with fleet(2, slots=2, request_buffer_size=100) as cluster:
        total_slots = 4

        async def generate(number: int) -> int:
            """One client sending three requests in a row, alternating streaming or not."""
            predicted = 0
            for turn in range(3):
                async with session.post(
                    f"{cluster.balancer.proxy_url}/completion",
                    json={
                        "prompt": f"request {number}.{turn}",
                        "n_predict": 96,
                        "ignore_eos": True,
                        "stream": (number + turn) % 2 == 0,
                    },
                ) as response:
                    assert response.status == 200, await response.text()
                    text = await response.text()
                predicted += tokens_predicted(text)
            return predicted

        urls = [server.url for server in cluster.servers]
        async with watching_llamacpp(session, urls) as watch:
            predicted = await asyncio.gather(*(generate(n) for n in range(3 * total_slots)))
        deferred, processing = watch.deferred, watch.processing
        assert predicted == [3 * 96] * (3 * total_slots)
        assert len(deferred) > 20  # the watcher saw the whole run, not a moment of it
        assert max(deferred) == 0
        assert max(processing) == 2  # the slots were really full, not trickled one by one
        for agent in cluster.balancer.pool.agents():
            assert agent.reserved == 0


async def test_a_client_disconnect_mid_stream_frees_the_llamacpp_slot(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """Leaving mid-stream cancels the upstream request: the slot is free within 2 s."""
    async with fleet(1, slots=1, model=slow_model) as cluster:
        server = cluster.servers[0]
        response = await session.post(
            f"{cluster.balancer.proxy_url}/completion",
            json={"prompt": "tell me", "n_predict": 4000, "ignore_eos": True, "stream": True},
        )
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        assert (await llamacpp_metrics(session, server.url))["requests_processing"] == 1
        response.close()
        left_at = time.monotonic()

        async def slot_idle() -> bool:
            async with session.get(f"{server.url}/slots") as slots:
                return not any(slot["is_processing"] for slot in await slots.json())

        await wait_until(slot_idle, timeout=2.0)
        freed_after = time.monotonic() - left_at
        assert freed_after < 2.0
        agent = cluster.balancer.pool.agents()[0]
        await wait_until(lambda: agent.free_slots() == 1, timeout=2.0)
        assert agent.reserved == 0
        async with session.post(
            f"{cluster.balancer.proxy_url}/completion",
            json={"prompt": "again", "n_predict": 4, "ignore_eos": True},
        ) as again:
            assert again.status == 200


async def test_a_killed_agent_is_removed_and_its_server_gets_no_new_requests(
    session: aiohttp.ClientSession,
) -> None:
    """SIGKILL an agent: it leaves the fleet at once and its llama.cpp is no longer used."""
    async with fleet(2) as cluster:
        victim, survivor = cluster.servers
        cluster.agents[0].send_signal(signal.SIGKILL)
        await cluster.agents[0].wait()
        await wait_until(lambda: len(cluster.balancer.pool.agents()) == 1, timeout=5)
        assert cluster.balancer.pool.agents()[0].name == "agent-1"
        before = await llamacpp_metrics(session, victim.url)
        for number in range(8):
            async with session.post(
                f"{cluster.balancer.proxy_url}/completion",
                json={"prompt": f"after {number}", "n_predict": 4, "ignore_eos": True},
            ) as response:
                assert response.status == 200
        after = await llamacpp_metrics(session, victim.url)
        assert after["prompt_tokens_total"] == before["prompt_tokens_total"]
        assert after["tokens_predicted_total"] == before["tokens_predicted_total"]
        assert (await llamacpp_metrics(session, survivor.url))["tokens_predicted_total"] >= 32


async def test_removing_an_agent_does_not_break_its_running_stream(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """A stream keeps going to the end after its agent is killed and removed."""
    async with fleet(1, slots=1, model=slow_model) as cluster:
        response = await session.post(
            f"{cluster.balancer.proxy_url}/completion",
            json={"prompt": "go", "n_predict": 300, "ignore_eos": True, "stream": True},
        )
        await response.content.readuntil(b"\n\n")
        cluster.agents[0].send_signal(signal.SIGKILL)
        await wait_until(lambda: cluster.balancer.pool.agents() == [], timeout=5)
        events = (await response.read()).decode().split("\n\n")
        final = json.loads([event for event in events if event.startswith("data: ")][-1][6:])
        assert final["stop"] is True
        assert final["tokens_predicted"] == 300
        response.release()


async def test_a_joining_agent_is_used(session: aiohttp.ClientSession, slow_model: Path) -> None:
    """An agent that registers while the fleet runs takes requests the others have no room for."""
    async with (
        fleet(1, slots=1, model=slow_model) as cluster,
        running_llamacpp(slow_model, slots=1) as joiner,
    ):
        busy = asyncio.create_task(
            session.post(
                f"{cluster.balancer.proxy_url}/completion",
                json={"prompt": "long", "n_predict": 4000, "ignore_eos": True, "stream": True},
            )
        )
        await wait_until(lambda: cluster.balancer.pool.agents()[0].reserved == 1)
        async with running_agent(
            llamacpp_port=joiner.port,
            management_port=cluster.balancer.balancer.management_port or 0,
            name="joiner",
            token=TOKEN,
        ):
            async with session.post(
                f"{cluster.balancer.proxy_url}/completion",
                json={"prompt": "short", "n_predict": 4, "ignore_eos": True},
            ) as response:
                assert response.status == 200
                assert (await response.json())["tokens_predicted"] == 4
            assert (await llamacpp_metrics(session, joiner.url))["tokens_predicted_total"] == 4
            assert not busy.done() or (await busy).status == 200
            (await busy).close()


async def test_pooled_connections_survive_llamacpp_keepalive_limits(
    session: aiohttp.ClientSession,
) -> None:
    """Past llama.cpp's 100 requests per connection and its 5 s idle close, no client sees an error."""
    async with fleet(1) as cluster:
        url = f"{cluster.balancer.proxy_url}/tokenize"
        for number in range(250):
            async with session.post(url, json={"content": f"word {number}"}) as response:
                assert response.status == 200, number
        await asyncio.sleep(5.5)  # the idle window itself is what is being tested
        async with session.post(url, json={"content": "after idle"}) as response:
            assert response.status == 200


async def test_an_unauthenticated_agent_is_refused(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent with a wrong token is refused, logged, and never joins the fleet."""
    caplog.set_level(logging.WARNING, logger="paddler")
    async with (
        running_balancer(management_token=TOKEN) as running,
        running_llamacpp(slots=1) as server,
        running_agent(
            llamacpp_port=server.port,
            management_port=running.balancer.management_port or 0,
            name="intruder",
            token="wrong-token",
        ) as intruder,
    ):
        async with session.get(
            f"{running.management_url}/api/v1/agents/socket",
            headers={"Authorization": "Bearer wrong-token"},
        ) as response:
            assert response.status == 401
            body = await response.json()
            assert body["error"]["type"] == "authentication_error"
        await wait_until(lambda: caplog.text.count("missing or wrong token") >= 3, timeout=10)
        assert running.pool.agents() == []
        assert intruder.returncode is None  # it keeps retrying with backoff; it does not crash


async def test_a_sigterm_deregisters_the_agent(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM makes the agent deregister before it exits."""
    caplog.set_level(logging.INFO, logger="paddler")
    async with fleet(1) as cluster:
        agent = cluster.agents[0]
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 10) == 0
        assert cluster.balancer.pool.agents() == []
        assert "agent agent-0 removed (it deregistered)" in caplog.text


def test_nothing_is_left_running() -> None:
    """No llama.cpp or agent child outlives the tests above."""
    own = os.getpid()
    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and _parent_of(int(pid)) == own]
    assert children == []


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1
