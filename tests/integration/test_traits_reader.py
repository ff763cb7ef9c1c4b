"""The traits reader's worker process: it reads what the event loop would, and survives dying."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler.balancer.routing.request_traits import NO_TRAITS, RequestTraits, inspect
from paddler.balancer.routing.traits_reader import TraitsReader
from tests.support.balancer import wait_until
from tests.unit.test_request_traits_properties import DOCUMENT, PATHS

pytestmark = pytest.mark.both_event_loops

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
    """Under the inline limit no worker is asked, nor started; the first larger body starts
    one, and a dead worker does not matter to small bodies."""
    async with TraitsReader(inline_bytes=1024) as reader:
        traits = await reader.read("POST", CHAT, {}, chat_body("m"))
        assert reader.worker_pid is None
        large = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        assert (await reader.read("POST", CHAT, {}, large)).prompt_chars == len(
            "user\x1f" + "x" * 2000 + "\x1e"
        )
        assert reader.worker_pid is not None
        await kill_worker(reader)
        assert await reader.read("POST", CHAT, {}, chat_body("m")) == traits
    assert traits == RequestTraits(model="m", prompt="user\x1fhi\x1e", prompt_chars=8)


# 15 MB of empty arrays, the slowest JSON to parse: a worker is still at it when killed.
SLOW_BODY = json.dumps({"messages": [[]] * 5_000_000, "model": "slow"}).encode()


async def kill_while_parsing(reader: TraitsReader, not_pid: int | None = None) -> int:
    """SIGKILL the reader's worker (one other than ``not_pid``) once it has read the slow
    body; return its pid."""
    await wait_until(lambda: reader.worker_pid not in (None, not_pid))
    pid = reader.worker_pid
    assert pid is not None
    await wait_until(lambda: bytes_read(pid) >= len(SLOW_BODY))
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_a_worker_lost_mid_body_is_replaced_and_the_body_read_again(
    worker_only: TraitsReader,
) -> None:
    """A new worker reads the body the first one died on; later bodies go to it."""
    assert (await worker_only.read("POST", CHAT, {}, chat_body("first"))).model == "first"
    reading = asyncio.create_task(worker_only.read("POST", CHAT, {}, SLOW_BODY))
    pid = await kill_while_parsing(worker_only)
    assert (await reading).model == "slow"
    assert (await worker_only.read("POST", CHAT, {}, chat_body("next"))).model == "next"
    assert worker_only.worker_pid not in (None, pid)


async def test_a_body_that_two_workers_die_on_gets_no_traits(worker_only: TraitsReader) -> None:
    """No third try: the body goes to llama.cpp unchanged, as one that is not JSON; the next
    body is read by a new worker."""
    reading = asyncio.create_task(worker_only.read("POST", CHAT, {}, SLOW_BODY))
    first = await kill_while_parsing(worker_only)
    await kill_while_parsing(worker_only, not_pid=first)
    assert await reading == NO_TRAITS
    assert (await worker_only.read("POST", CHAT, {}, chat_body("next"))).model == "next"


async def test_a_worker_that_died_between_bodies_costs_nothing(worker_only: TraitsReader) -> None:
    """A worker found dead when a body comes is replaced before that body is sent."""
    assert (await worker_only.read("POST", CHAT, {}, chat_body("first"))).model == "first"
    await kill_worker(worker_only)
    assert (await worker_only.read("POST", CHAT, {}, chat_body("m"))).model == "m"


def bytes_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as io:
        fields = dict(line.split(": ") for line in io.read().splitlines())
    return int(fields["rchar"])


async def kill_worker(reader: TraitsReader) -> None:
    """SIGKILL the reader's worker process and wait until it is dead."""
    pid = reader.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not running(pid))


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
