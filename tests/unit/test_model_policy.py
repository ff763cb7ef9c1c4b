"""Which servers may serve a request that names a model: the rule of docs/routing.md."""

from __future__ import annotations

import asyncio

import pytest

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.request_buffer import RequestBuffer, UnknownModel
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join


def status(idle: int, *models: str) -> Status:
    return Status(state=LlamaCppState.OK, slots_idle=idle, models=models)


def address(port: int) -> Address:
    return Address("http", "127.0.0.1", port)


def test_a_one_model_fleet_serves_any_name_as_a_single_llamacpp_would() -> None:
    """gpt-4o-mini, any, or nothing at all: one model, so every request goes to it."""
    pool = AgentControllerPool()
    a, _ = join(pool, "a", address(1), status(1, "/models/tiny.gguf"))
    b, _ = join(pool, "b", address(2), status(1, "/other/place/tiny.gguf"))
    assert pool.model_ids() == ["tiny"]
    for name in ("gpt-4o-mini", "any", "tiny", "tiny.gguf", "/models/tiny.gguf", None):
        assert name is None or pool.accepts(name)
        assert pool.pick(Demand(True, name)) in (a, b)


def test_a_model_is_known_by_its_path_its_file_name_and_its_stem() -> None:
    """In a fleet of two models, each file's names reach its own servers only."""
    pool = AgentControllerPool()
    small, _ = join(pool, "small", address(1), status(4, "/models/small-q4.gguf"))
    large, _ = join(pool, "large", address(2), status(1, "/models/large-q8.gguf"))
    for name in ("small-q4", "small-q4.gguf", "/models/small-q4.gguf"):
        assert pool.knows(name)
        assert pool.pick(Demand(True, name)) is small
    for name in ("large-q8", "large-q8.gguf", "/models/large-q8.gguf"):
        assert pool.pick(Demand(True, name)) is large
    assert sorted(pool.models()) == ["large-q8", "small-q4"]


def test_an_unknown_name_is_refused_only_in_a_fleet_of_several_models() -> None:
    """Which model would "gpt-4o-mini" be? Refused, unless --allow-unknown-models."""
    pool = AgentControllerPool()
    join(pool, "alpha", address(1), status(1, "alpha"))
    assert pool.accepts("gpt-4o-mini")
    join(pool, "beta", address(2), status(1, "beta"))
    assert not pool.accepts("gpt-4o-mini")
    assert pool.pick(Demand(True, "gpt-4o-mini")) is None
    lenient = AgentControllerPool(allow_unknown_models=True)
    join(lenient, "alpha", address(1), status(1, "alpha"))
    join(lenient, "beta", address(2), status(3, "beta"))
    assert lenient.accepts("gpt-4o-mini")
    picked = lenient.pick(Demand(True, "gpt-4o-mini"))
    assert picked is not None
    assert picked.name == "beta"


def test_a_fleet_that_reported_no_model_yet_accepts_every_name() -> None:
    """Scaling from zero: the first server's model is not known before it loads."""
    pool = AgentControllerPool()
    assert pool.accepts("anything")
    join(pool, "loading", address(1), Status(state=LlamaCppState.LOADING))
    assert pool.accepts("anything")


async def test_a_waiting_request_is_served_by_the_first_server_of_a_one_model_fleet() -> None:
    """A request that names a model waits in an empty fleet and goes to whatever comes."""
    pool = AgentControllerPool()
    buffer = RequestBuffer(pool, size=4, timeout=5)
    waiting = asyncio.create_task(buffer.acquire(Demand(True, "gpt-4o-mini")))
    await asyncio.sleep(0)
    assert buffer.waiting == 1
    agent, _ = join(pool, "a", address(1), status(1, "tiny"))
    guard = await asyncio.wait_for(waiting, 1)
    assert guard.agent is agent
    guard.release()


async def test_a_waiting_request_whose_name_becomes_ambiguous_is_refused() -> None:
    """When a second model joins, a waiting request for an unknown name gets a clear no."""
    pool = AgentControllerPool()
    join(pool, "busy", address(1), status(0, "alpha"))
    buffer = RequestBuffer(pool, size=4, timeout=5)
    waiting = asyncio.create_task(buffer.acquire(Demand(True, "gpt-4o-mini")))
    await asyncio.sleep(0)
    assert buffer.waiting == 1
    join(pool, "beta", address(2), status(1, "beta"))
    with pytest.raises(UnknownModel):
        await asyncio.wait_for(waiting, 1)
    assert buffer.waiting == 0
