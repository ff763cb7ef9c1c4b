"""Model-aware and prefix-aware routing, end to end on real llama.cpp servers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.balancer import wait_until
from tests.support.fleet import fleet
from tests.support.metrics import llamacpp_metrics


def chat(model: str | None, content: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }
    if model is not None:
        body["model"] = model
    return body


async def test_requests_go_only_to_servers_of_the_model_they_name(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """Two llama.cpp servers started with different aliases: each name reaches its own server,
    for POST bodies and for GET ?model=; /v1/models lists both; an unknown name gets 404."""
    async with fleet(["alpha", "beta"], model=slow_model, slots=2) as cluster:
        proxy = cluster.balancer.proxy_url
        async with session.get(f"{proxy}/v1/models") as response:
            assert response.status == 200
            listing = await response.json()
        assert listing["object"] == "list"
        assert [model["id"] for model in listing["data"]] == ["alpha", "beta"]
        assert listing["data"][0]["paddler"] == {
            "names": ["alpha"],
            "agents": 1,
            "agents_usable": 1,
            "slots_total": 2,
            "slots_idle": 2,
        }
        for model in ["alpha", "beta", "beta", "alpha", "alpha", "beta"]:
            async with session.post(f"{proxy}/v1/chat/completions", json=chat(model, "hi")) as r:
                assert r.status == 200
                assert r.headers["X-Paddler-Agent"] == f"agent-{model}"
        for model in ["beta", "alpha"]:
            async with session.get(f"{proxy}/props", params={"model": model}) as response:
                assert response.status == 200
                assert (await response.json())["model_alias"] == model
                assert response.headers["X-Paddler-Agent"] == f"agent-{model}"

        async with session.post(f"{proxy}/v1/chat/completions", json=chat("gamma", "hi")) as r:
            assert r.status == 404
            error = (await r.json())["error"]
        assert error["code"] == 404
        assert error["type"] == "not_found_error"
        assert "gamma" in error["message"]

        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="unused")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        models = await client.models.list()
        assert [model.id for model in models.data] == ["alpha", "beta"]
        await client.close()


async def test_a_request_for_one_model_never_waits_behind_another_models_slots(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """alpha's only slot is busy and an alpha request waits in the buffer; a beta request is
    served meanwhile, and alpha's waiting request gets alpha's slot once it frees."""
    async with fleet(
        ["alpha", "beta"], model=slow_model, slots=1, request_buffer_size=4
    ) as cluster:
        proxy = cluster.balancer.proxy_url
        first_chunk = asyncio.Event()

        async def long_alpha_stream() -> None:
            body = chat("alpha", "a long story", max_tokens=100_000, stream=True)
            async with session.post(f"{proxy}/v1/chat/completions", json=body) as response:
                assert response.headers["X-Paddler-Agent"] == "agent-alpha"
                async for _ in response.content.iter_any():
                    first_chunk.set()

        stream = asyncio.create_task(long_alpha_stream())
        await asyncio.wait_for(first_chunk.wait(), timeout=30)

        async def alpha_request() -> str:
            async with session.post(
                f"{proxy}/v1/chat/completions", json=chat("alpha", "waiting")
            ) as response:
                assert response.status == 200
                return response.headers["X-Paddler-Agent"]

        waiting = asyncio.create_task(alpha_request())
        buffer = cluster.balancer.balancer.buffer
        await wait_until(lambda: buffer.waiting_for("alpha") == 1)
        async with session.post(f"{proxy}/v1/chat/completions", json=chat("beta", "hi")) as r:
            assert r.status == 200
            assert r.headers["X-Paddler-Agent"] == "agent-beta"
        assert not stream.done()
        assert not waiting.done()
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        assert await asyncio.wait_for(waiting, timeout=30) == "agent-alpha"
        for server in cluster.servers:
            metrics = await llamacpp_metrics(session, server.url)
            assert metrics["requests_deferred"] == 0


async def test_unknown_models_may_be_allowed_to_reach_any_server(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """With --allow-unknown-models, a name no server serves is accepted, as by one llama.cpp."""
    async with fleet(["alpha"], model=slow_model, slots=1, allow_unknown_models=True) as cluster:
        body = chat("gpt-4o-mini", "hi")
        async with session.post(
            f"{cluster.balancer.proxy_url}/v1/chat/completions", json=body
        ) as response:
            assert response.status == 200
            assert response.headers["X-Paddler-Agent"] == "agent-alpha"


def scrape(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in the metrics")


@pytest.mark.parametrize("workers", [1, 2])
async def test_prefix_routing_keeps_each_conversation_where_llamacpp_caches_it(
    session: aiohttp.ClientSession, slow_model: Path, workers: int
) -> None:
    """Four conversations with long, distinct system prompts, three turns each, on two servers
    of two slots: each conversation stays on one server, llama.cpp reports its system prompt
    cached on every later turn, and /metrics counts exactly what llama.cpp reported; with two
    worker processes too, whose turns the one fleet host routes and learns from."""
    rng = random.Random(7)
    systems = ["".join(rng.choices("abcdefghij klmno", k=1200)) for _ in range(4)]
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": system}] for system in systems
    ]
    served_by: list[set[str]] = [set() for _ in systems]
    reported = {"cached": 0, "total": 0}
    later_turn_cached: list[int] = []
    async with fleet(
        [None, None], model=slow_model, slots=2, routing="prefix", workers=workers
    ) as cluster:
        proxy = cluster.balancer.proxy_url

        async def turn(index: int, number: int) -> None:
            messages = [*histories[index], {"role": "user", "content": f"question {number}" * 5}]
            body = {"messages": messages, "max_tokens": 4, "ignore_eos": True}
            async with session.post(f"{proxy}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                served_by[index].add(response.headers["X-Paddler-Agent"])
                timings = (await response.json())["timings"]
            reported["cached"] += timings["cache_n"]
            reported["total"] += timings["cache_n"] + timings["prompt_n"]
            if number:
                later_turn_cached.append(timings["cache_n"])
            histories[index] = [*messages, {"role": "assistant", "content": f"answer {number}"}]

        for number in range(3):
            await asyncio.gather(*(turn(index, number) for index in range(len(systems))))

        metrics = ""

        async def learned_everything() -> bool:
            # A worker tells the fleet host what llama.cpp cached as its answer ends: the last
            # report may land just after the client read that answer.
            nonlocal metrics
            async with session.get(f"{cluster.balancer.management_url}/metrics") as response:
                metrics = await response.text()
            return scrape(metrics, "paddler_prompt_tokens_total") == reported["total"]

        await wait_until(learned_everything)

    assert all(len(agents) == 1 for agents in served_by), served_by
    assert {agent for agents in served_by for agent in agents} == {"agent-0", "agent-1"}
    assert len(later_turn_cached) == 8
    assert min(later_turn_cached) >= 1200
    assert scrape(metrics, "paddler_prompt_tokens_cached_total") == reported["cached"]
    assert scrape(metrics, "paddler_prompt_tokens_total") == reported["total"]
    predicted = scrape(metrics, "paddler_prompt_tokens_cached_predicted_total")
    assert 0.8 * reported["cached"] <= predicted <= reported["cached"]
    assert scrape(metrics, 'paddler_routing_decisions_total{reason="prefix"}') == 8
    index_bytes = scrape(metrics, "paddler_prefix_index_bytes")
    assert 0 < index_bytes <= scrape(metrics, "paddler_prefix_index_bytes_limit")
