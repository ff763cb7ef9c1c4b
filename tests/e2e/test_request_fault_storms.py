"""No sequence of client requests takes a healthy llama.cpp server out of rotation.

Real llama.cpp servers, real agents: storms of requests that are their own fault (embeddings on
servers without ``--embeddings``, invalid JSON, a context overflow, and a 500 that llama.cpp
produces on demand) pass llama.cpp's own answers through, and leave every server usable.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.routing.policies import Demand
from tests.support.fleet import Server, fleet
from tests.support.llamacpp import tiny_model_path

# llama.cpp fails to detokenize a token id beyond its vocabulary with a 500 (vector range check).
DETOKENIZE_500 = {"tokens": [99_999_999]}


async def test_storms_of_request_faults_leave_every_server_in_rotation(
    session: aiohttp.ClientSession,
) -> None:
    """501, 400 (bad JSON, context overflow) and 500 answers reach the client unchanged, count
    against no server, and the next request is served at once."""
    async with fleet(2, slots=2, request_buffer_size=200) as cluster:
        proxy = cluster.balancer.proxy_url
        pool = cluster.balancer.pool
        opened: list[AgentController] = []
        pool.on_circuit_open(opened.append)
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=2)

        async def embeddings() -> None:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.embeddings.create(model="anything", input="hello")
            assert raised.value.status_code == 501
            assert "--embeddings" in raised.value.message

        async def bad_json() -> None:
            async with session.post(
                f"{proxy}/v1/chat/completions",
                data=b'{"messages": [',
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 400
                assert "parse error" in (await response.json())["error"]["message"]

        async def overflow() -> None:
            body = {"prompt": "a" * 3000, "n_predict": 4}
            async with session.post(f"{proxy}/completion", json=body) as response:
                assert response.status == 400
                assert (await response.json())["error"]["type"] == "exceed_context_size_error"

        async def internal_error() -> None:
            async with session.post(f"{proxy}/detokenize", json=DETOKENIZE_500) as response:
                assert response.status == 500
                error = (await response.json())["error"]
                assert error["type"] == "server_error"
                assert "range" in error["message"]

        storm = [embeddings() for _ in range(6)]
        storm += [job() for job in (bad_json, overflow, internal_error) for _ in range(12)]
        await asyncio.gather(*storm)
        await client.close()

        assert opened == []
        for agent in pool.agents():
            assert agent.usable(), agent.name
            assert agent.consecutive_failures == 0, agent.name
        async with session.get(f"{proxy}/health") as response:
            assert response.status == 200
            assert (await response.json())["slots_idle"] == 4
        assert pool.pick(Demand(True)) is not None  # a slot is free for the next request now
        async with session.post(
            f"{proxy}/completion", json={"prompt": "hi", "n_predict": 2}
        ) as response:
            assert response.status == 200


async def test_embeddings_find_the_one_server_started_with_embeddings() -> None:
    """A mixed fleet: embeddings are served every time (the first after one invisible retry),
    chats still use both servers, and the server without --embeddings is never blamed."""
    plain = Server(alias="tiny", name="plain")
    embedder = Server(
        alias="tiny", name="embedder", extra_args=("--embeddings", "--pooling", "mean")
    )
    async with fleet([plain, embedder], slots=2) as cluster:
        proxy = cluster.balancer.proxy_url
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)
        for _ in range(5):
            response = await client.embeddings.with_raw_response.create(model="tiny", input="hi")
            assert response.headers["X-Paddler-Agent"] == "embedder"
            assert len(response.parse().data[0].embedding) == 64

        async def chat(number: int) -> str:
            response = await client.completions.with_raw_response.create(
                model="tiny",
                prompt=f"story {number}",
                max_tokens=64,
                extra_body={"ignore_eos": True},
            )
            return str(response.headers["X-Paddler-Agent"])

        served_by = await asyncio.gather(*(chat(number) for number in range(4)))
        await client.close()
        assert set(served_by) == {"plain", "embedder"}
        for agent in cluster.balancer.pool.agents():
            assert agent.usable()
            assert agent.consecutive_failures == 0


async def test_a_one_model_fleet_serves_any_model_name_through_the_official_sdk() -> None:
    """Apps that send a fixed name (gpt-4o-mini) or the model's file name are served, as
    by one llama.cpp; the fleet lists the model by its file name."""
    async with fleet([None, None], slots=1) as cluster:
        client = openai.AsyncOpenAI(
            base_url=f"{cluster.balancer.proxy_url}/v1", api_key="unused", max_retries=0
        )
        (listed,) = (await client.models.list()).data
        assert listed.id.startswith("paddler-tiny-")
        for name in ("gpt-4o-mini", "any", listed.id, f"{listed.id}.gguf"):
            completion = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert completion.choices[0].message is not None
        await client.close()


async def test_two_models_without_aliases_are_told_apart_by_their_file_names(
    session: aiohttp.ClientSession, slow_model: Path
) -> None:
    """Servers started without --alias: each file name, with or without .gguf, and each path
    reach that model's server; a made-up name gets 404 that says what to do."""
    async with fleet([Server(), Server(model=slow_model)], slots=1) as cluster:
        proxy = cluster.balancer.proxy_url
        async with session.get(f"{proxy}/v1/models") as response:
            ids = [model["id"] for model in (await response.json())["data"]]
        tiny = tiny_model_path().stem
        assert sorted(ids) == sorted([tiny, slow_model.stem])
        for index, model_id in enumerate([tiny, slow_model.stem]):
            for name in (model_id, f"{model_id}.gguf"):
                body = {"model": name, "prompt": "hi", "max_tokens": 2}
                async with session.post(f"{proxy}/v1/completions", json=body) as response:
                    assert response.status == 200
                    assert response.headers["X-Paddler-Agent"] == f"agent-{index}"
        body = {"model": str(slow_model), "prompt": "hi", "max_tokens": 2}
        async with session.post(f"{proxy}/v1/completions", json=body) as response:
            assert response.headers["X-Paddler-Agent"] == "agent-1"
        body = {"model": "gpt-4o-mini", "prompt": "hi", "max_tokens": 2}
        async with session.post(f"{proxy}/v1/completions", json=body) as response:
            assert response.status == 404
            message = (await response.json())["error"]["message"]
        assert slow_model.stem in message
        assert "GET /v1/models" in message
        assert "--allow-unknown-models" in message
