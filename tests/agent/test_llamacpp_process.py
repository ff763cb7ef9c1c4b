"""LlamaCppProcess runs real llama.cpp children: restarts them, and never leaves one behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from paddler.agent.llamacpp_options import LlamaCppOptionError
from paddler.agent.llamacpp_process import LlamaCppGaveUp, LlamaCppProcess
from paddler.config import LlamaCppLaunch
from tests.support.llamacpp import process_exists, truncated_model
from tests.support.logs import watching

pytestmark = pytest.mark.llamacpp


def launch(model: Path) -> LlamaCppLaunch:
    return LlamaCppLaunch(
        model=model,
        slots=2,
        context_size=2048,
        threads=1,
        cache_ram_mib=0,
        restart_backoff_max=0.5,
    )


@contextlib.asynccontextmanager
async def supervising(process: LlamaCppProcess) -> AsyncIterator[asyncio.Event]:
    shutdown = asyncio.Event()
    task = asyncio.create_task(process.run(shutdown))
    try:
        yield shutdown
    finally:
        shutdown.set()
        await task


async def health(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/health") as response:
        return response.status


async def test_process_restarts_a_killed_child_on_the_same_port(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """After the child is killed with SIGKILL, a new one serves on the port the first one chose."""
    process = LlamaCppProcess(launch(tiny_model), "127.0.0.1", 0, None)
    async with supervising(process):
        async with asyncio.timeout(20):
            first_url = await process.wait_ready()
        first_pid, first_port = process.pid, process.port
        assert first_pid is not None and first_port is not None
        os.kill(first_pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            second_url = await process.wait_ready(after=process.generation)
        assert second_url == first_url == f"http://127.0.0.1:{first_port}"
        assert process.port == first_port
        assert process.pid not in (None, first_pid)
        assert await health(session, second_url) == 200
        second_pid = process.pid
    assert process.url is None
    assert not process_exists(first_pid)
    assert not process_exists(second_pid)


async def test_process_leaves_no_child_behind_when_its_task_is_cancelled(
    tiny_model: Path,
) -> None:
    """Cancelling run() instead of setting shutdown still stops and reaps the child."""
    process = LlamaCppProcess(launch(tiny_model), "127.0.0.1", 0, None)
    task = asyncio.create_task(process.run(asyncio.Event()))
    async with asyncio.timeout(20):
        await process.wait_ready()
    pid = process.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not process_exists(pid)


async def test_process_passes_the_api_key_to_llamacpp(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """A child started with an API key refuses requests without it."""
    process = LlamaCppProcess(launch(tiny_model), "127.0.0.1", 0, "secret")
    async with supervising(process):
        async with asyncio.timeout(20):
            url = await process.wait_ready()
        async with session.get(f"{url}/slots") as response:
            assert response.status == 401
        headers = {"Authorization": "Bearer secret"}
        async with session.get(f"{url}/slots", headers=headers) as response:
            assert response.status == 200
            assert len(await response.json()) == 2


async def test_process_logs_why_a_child_failed_to_start_and_tries_again(tmp_path: Path) -> None:
    """A child that cannot load its model is reported with llama.cpp's last words, then retried."""
    process = LlamaCppProcess(launch(tmp_path / "missing.gguf"), "127.0.0.1", 0, None)
    with watching("paddler.agent.llamacpp_process") as log:
        async with supervising(process):
            failures = await log.wait_for(logging.ERROR, count=2, containing="did not start")
    assert "exited with code 1 before it was ready" in failures[0]
    assert "failed to load model" in failures[0]
    assert process.url is None and process.generation == 0


async def test_process_passes_extra_llamacpp_options_to_its_child(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """``extra_args`` reach llama.cpp: with --embeddings --pooling mean the child embeds."""
    embedding = dataclasses.replace(
        launch(tiny_model), extra_args=("--embeddings", "--pooling", "mean")
    )
    process = LlamaCppProcess(embedding, "127.0.0.1", 0, None)
    async with supervising(process):
        async with asyncio.timeout(20):
            url = await process.wait_ready()
        async with session.post(f"{url}/v1/embeddings", json={"input": "hello"}) as response:
            assert response.status == 200
            body = await response.json()
    assert len(body["data"][0]["embedding"]) > 0


def test_process_refuses_extra_options_that_no_child_could_take(tiny_model: Path) -> None:
    """A bad llama.cpp option fails at construction instead of a child failing forever."""
    bad = dataclasses.replace(launch(tiny_model), extra_args=("--ctx-size", "8192"))
    with pytest.raises(LlamaCppOptionError, match="use paddler agent --context-size instead"):
        LlamaCppProcess(bad, "127.0.0.1", 0, None)


async def test_process_gives_up_on_a_model_that_never_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A truncated model fails the same way every time: after three attempts the process
    stops trying and says llama.cpp's reason in one line, instead of restarting forever."""
    truncated = truncated_model(tmp_path)
    process = LlamaCppProcess(launch(truncated), "127.0.0.1", 0, None, max_failed_starts=3)
    with watching("paddler.agent.llamacpp_process") as log:
        with pytest.raises(LlamaCppGaveUp) as gave_up:
            await asyncio.wait_for(process.run(asyncio.Event()), 60)
        failures = await log.wait_for(logging.ERROR, count=3, containing="did not start")
    assert len(failures) == 3
    message = str(gave_up.value)
    assert "\n" not in message
    assert "3 attempts" in message and str(truncated) in message
    assert "corrupted or incomplete" in message
