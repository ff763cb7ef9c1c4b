"""The traits reader's worker process: it reads what the event loop would, and survives dying."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler.balancer.request_traits import NO_TRAITS, RequestTraits, inspect
from paddler.balancer.traits_reader import TraitsReader
from tests.unit.test_request_traits_properties import DOCUMENT, PATHS

CHAT = "/v1/chat/completions"


@pytest.fixture
async def worker_only() -> AsyncIterator[TraitsReader]:
    """A reader that sends every body, however small, to its worker process."""
    async with TraitsReader(inline_bytes=0) as reader:
        yield reader


def chat_body(model: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": model}).encode()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=PATHS,
    body=DOCUMENT.map(lambda document: json.dumps(document).encode()) | st.binary(max_size=500),
    query_model=st.none() | st.text(min_size=1),
)
async def test_the_worker_reads_every_body_as_the_event_loop_does(
    worker_only: TraitsReader, path: str, body: bytes, query_model: str | None
) -> None:
    """Inline and in the worker, the same body yields the same traits (JSON or not)."""
    query = {"model": query_model} if query_model else {}
    assert await worker_only.read("POST", path, query, body) == inspect("POST", path, query, body)


async def test_small_bodies_are_read_on_the_event_loop() -> None:
    """Under the inline limit no worker is asked: a dead worker does not matter to them."""
    async with TraitsReader() as reader:
        kill_worker()
        traits = await reader.read("POST", CHAT, {}, chat_body("m"))
    assert traits == RequestTraits(model="m", prompt="user\x1fhi\x1e", prompt_chars=8)


async def test_a_dead_worker_costs_its_request_the_traits_and_is_replaced(
    worker_only: TraitsReader,
) -> None:
    """A body the worker was lost on yields no traits (llama.cpp gets it unchanged); the next
    body is read by a new worker."""
    assert (await worker_only.read("POST", CHAT, {}, chat_body("first"))).model == "first"
    kill_worker()
    assert await worker_only.read("POST", CHAT, {}, chat_body("lost")) == NO_TRAITS
    assert (await worker_only.read("POST", CHAT, {}, chat_body("next"))).model == "next"


def kill_worker() -> None:
    workers: list[Any] = multiprocessing.active_children()
    assert len(workers) == 1, workers
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].join()
