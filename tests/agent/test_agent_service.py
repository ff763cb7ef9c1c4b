"""The whole agent: its own llama.cpp child, the monitor and the link, against a scripted balancer."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest

from paddler import protocol
from paddler.agent.service import Agent
from paddler.config import Address, AgentConfig, LlamaCppLaunch
from paddler.protocol import Deregister, LlamaCppState
from tests.support.fake_balancer import running_fake_balancer
from tests.support.llamacpp import process_exists


@pytest.mark.llamacpp
async def test_agent_runs_llamacpp_registers_its_port_and_cleans_up_on_shutdown(
    tiny_model: Path,
) -> None:
    """With --model and port 0, the agent registers the child's real port and an ok status
    (naming its model from the start, even while llama.cpp loads); shutdown deregisters it and
    leaves no llama.cpp behind."""
    async with running_fake_balancer() as balancer:
        config = AgentConfig(
            local=Address("http", "127.0.0.1", 0),
            external=Address("http", "127.0.0.1", 0),
            management_port=balancer.port,
            monitoring_interval=0.05,
            launch=LlamaCppLaunch(
                model=tiny_model, slots=2, context_size=2048, threads=1, alias="tiny"
            ),
        )
        agent = Agent(config)
        shutdown = asyncio.Event()
        task = asyncio.create_task(agent.run(shutdown))
        try:
            _, register = await balancer.next_message(timeout=20)
            assert isinstance(register, protocol.Register)
            assert agent.process is not None
            port = agent.process.port
            pid = agent.process.pid
            assert register.port == port
            assert register.name == f"{socket.gethostname()}:{port}"
            status = register.status
            while status.state is not LlamaCppState.OK:
                assert status.models == ("tiny",)
                _, message = await balancer.next_message(timeout=20)
                assert isinstance(message, protocol.Status)
                status = message
            assert status.slots_idle == 2
            assert status.models == ("tiny",)
        finally:
            shutdown.set()
            async with asyncio.timeout(10):
                await task
        _, last = await balancer.next_message()
        while not isinstance(last, protocol.Deregister):
            _, last = await balancer.next_message()
    assert pid is not None and not process_exists(pid)


def test_agent_refuses_port_zero_without_a_model_to_run() -> None:
    """Port 0 means "the port our llama.cpp picked", so it needs --model."""
    config = AgentConfig(
        local=Address("http", "127.0.0.1", 8088), external=Address("http", "127.0.0.1", 0)
    )
    with pytest.raises(ValueError, match="port 0"):
        Agent(config)


@pytest.mark.llamacpp
async def test_an_agent_names_its_model_while_its_llamacpp_is_still_loading(
    tiny_model: Path,
) -> None:
    """The balancer learns the model before llama.cpp answers, so that requests naming it are
    known while the fleet scales up."""
    async with running_fake_balancer() as balancer:
        config = AgentConfig(
            local=Address("http", "127.0.0.1", 0),
            external=Address("http", "127.0.0.1", 9),  # registered at once, before the child
            management_port=balancer.port,
            monitoring_interval=0.05,
            launch=LlamaCppLaunch(model=tiny_model, slots=1, context_size=512, threads=1),
        )
        shutdown = asyncio.Event()
        task = asyncio.create_task(Agent(config).run(shutdown))
        try:
            _, register = await balancer.next_message(timeout=20)
            assert isinstance(register, protocol.Register)
            assert register.status.state is LlamaCppState.LOADING
            assert register.status.models == (str(tiny_model),)
        finally:
            shutdown.set()
            async with asyncio.timeout(10):
                await task


async def _ready_agent(
    balancer_port: int, model: Path, drain: float
) -> tuple[Agent, asyncio.Event, asyncio.Task[None]]:
    config = AgentConfig(
        local=Address("http", "127.0.0.1", 0),
        external=Address("http", "127.0.0.1", 0),
        management_port=balancer_port,
        monitoring_interval=0.05,
        shutdown_drain_timeout=drain,
        launch=LlamaCppLaunch(model=model, slots=1, context_size=2048, threads=1),
    )
    agent = Agent(config)
    shutdown = asyncio.Event()
    task = asyncio.create_task(agent.run(shutdown))
    assert agent.process is not None
    await asyncio.wait_for(agent.process.wait_ready(), 20)
    return agent, shutdown, task


@pytest.mark.llamacpp
async def test_a_stopping_agent_deregisters_then_lets_running_requests_finish(
    slow_model_for_agents: Path,
) -> None:
    """SIGTERM on a host under load: the balancer is told at once, the stream running on
    llama.cpp completes, and only then does llama.cpp stop."""
    async with running_fake_balancer() as balancer, aiohttp.ClientSession() as session:
        agent, shutdown, task = await _ready_agent(balancer.port, slow_model_for_agents, 30)
        assert agent.process is not None and agent.process.url is not None
        pid = agent.process.pid
        body = {"prompt": "tell", "n_predict": 1500, "ignore_eos": True, "stream": True}
        events_at_deregistration = 0
        async with session.post(f"{agent.process.url}/completion", json=body) as response:
            events = []
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    shutdown.set()
                    while not isinstance((await balancer.next_message(timeout=5))[1], Deregister):
                        pass
                    events_at_deregistration = len(events)
        assert events[-1]["stop"] is True
        assert events[-1]["tokens_predicted"] == 1500
        # llama.cpp went on serving after the agent had left the balancer.
        assert events_at_deregistration < len(events) - 100
        await asyncio.wait_for(task, 10)
    assert pid is not None and not process_exists(pid)


@pytest.mark.llamacpp
async def test_the_drain_of_a_stopping_agent_is_bounded(slow_model_for_agents: Path) -> None:
    """A generation that would run for minutes does not keep the host from stopping."""
    async with running_fake_balancer() as balancer, aiohttp.ClientSession() as session:
        agent, shutdown, task = await _ready_agent(balancer.port, slow_model_for_agents, 0.5)
        assert agent.process is not None and agent.process.url is not None
        body = {"prompt": "tell", "n_predict": 100_000, "ignore_eos": True, "stream": True}
        async with session.post(f"{agent.process.url}/completion", json=body) as response:
            await response.content.readline()
            started = asyncio.get_running_loop().time()
            shutdown.set()
            await asyncio.wait_for(task, 15)
            stopped_after = asyncio.get_running_loop().time() - started
        assert stopped_after >= 0.5
