"""The open-loop client: every request leaves at its scheduled time, answered or not.

A closed loop (send, wait, send) slows down with the server and hides overload; real users do
not wait for each other. Here each request of a workload is sent at its offset from the run's
start whatever is still outstanding, and a contestant that cannot keep up shows it as growing
time to first token, not as a lower offered load.

One constraint is kept from real users: a chat session's next turn is never sent before the
answer to its previous turn has ended (a person reads the answer before replying). Such a turn
leaves at its scheduled time or when that answer ends, whichever is later; its latencies count
from when it actually left. Without this, an overloaded proxy would be sent turns that extend
answers not given yet, which no prompt cache can serve and no chat client sends.

Each request streams ``POST /v1/chat/completions``. Time to first token runs from the moment
it is sent to the first chunk that carries content (llama.cpp's first chunk only names the
role). The last chunk carries llama.cpp's own ``timings``: ``cache_n`` (prompt tokens reused
from its cache), ``prompt_n`` (prompt tokens computed) and ``predicted_n``. Every request has
a deadline; one that misses it counts as a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.contestants import Contestant
from bench.workloads import ChatRequest

ROUTE = "/v1/chat/completions"
_HEADERS = {"Content-Type": "application/json"}
_HEADERS_CLOSE = {**_HEADERS, "Connection": "close"}
_DATA = b"data: "
_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class ChatSample:
    sent: float
    """Seconds after the run started."""
    ttft: float | None
    total: float | None
    tokens: int
    """Generated tokens, as llama.cpp counted them (``predicted_n``)."""
    cache_n: int
    prompt_n: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class OpenLoopRun:
    samples: list[ChatSample]
    """In the order of the workload's requests."""
    span: float
    """Seconds from the first send to the last completion (or failure)."""


async def run_open_loop(
    session: aiohttp.ClientSession,
    contestant: Contestant,
    requests: list[ChatRequest],
    timeout: float,
) -> OpenLoopRun:
    """Send each of ``requests`` at its time through ``contestant``; wait for every answer."""
    bodies = [request.body() for request in requests]
    headers = _HEADERS_CLOSE if contestant.fresh_connections else _HEADERS
    tasks: list[asyncio.Task[ChatSample]] = []
    previous_turn: dict[int, asyncio.Task[ChatSample]] = {}
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for index, (request, body) in enumerate(zip(requests, bodies, strict=True)):
            delay = started + request.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url = contestant.url_for(index) + ROUTE
            turn = stream_chat(session, url, body, request.max_tokens, headers, timeout, started)
            if request.session is not None and request.session in previous_turn:
                turn = _after(previous_turn[request.session], turn)
            task = group.create_task(turn)
            if request.session is not None:
                previous_turn[request.session] = task
            tasks.append(task)
    samples = [task.result() for task in tasks]
    ends = [sample.sent + (sample.total or 0.0) for sample in samples]
    first = min((sample.sent for sample in samples), default=0.0)
    return OpenLoopRun(samples, max(ends, default=0.0) - first)


async def _after(
    previous: asyncio.Task[ChatSample], turn: Coroutine[Any, Any, ChatSample]
) -> ChatSample:
    """Run ``turn`` once ``previous`` (the same session's last turn) has ended."""
    await asyncio.wait([previous])
    return await turn


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    max_tokens: int,
    headers: dict[str, str],
    timeout: float,
    run_started: float,
) -> ChatSample:
    """Send one streaming chat request and time it; any failure (a short answer too) becomes
    a sample's error."""
    started = time.perf_counter()
    sent = started - run_started
    first: float | None = None
    timings: dict[str, Any] | None = None

    def failed(error: str) -> ChatSample:
        return ChatSample(sent, first, time.perf_counter() - started, 0, 0, 0, error)

    try:
        async with (
            asyncio.timeout(timeout),
            session.post(url, data=body, headers=headers) as response,
        ):
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                return failed(f"HTTP {response.status}: {text}")
            async for line in response.content:
                if not line.startswith(_DATA) or line.startswith(_DONE):
                    continue
                # Only chunks that may matter are parsed: the client's CPU is the servers' too.
                if first is None or b'"timings"' in line or b'"error"' in line:
                    event = json.loads(line[len(_DATA) :])
                    if "error" in event:
                        return failed(f"error event: {event['error']}")
                    if first is None and _has_content(event):
                        first = time.perf_counter() - started
                    timings = event.get("timings", timings)
    except TimeoutError:
        return failed(f"timeout after {timeout:g} s")
    except (aiohttp.ClientError, json.JSONDecodeError) as error:
        return failed(f"{type(error).__name__}: {error}")
    total = time.perf_counter() - started
    if timings is None or first is None:
        return failed("the stream ended without content or without timings")
    tokens = int(timings.get("predicted_n", 0))
    return ChatSample(
        sent,
        first,
        total,
        tokens,
        int(timings.get("cache_n", 0)),
        int(timings.get("prompt_n", 0)),
        None if tokens == max_tokens else f"{tokens} tokens instead of {max_tokens}",
    )


def _has_content(event: dict[str, Any]) -> bool:
    return any(choice.get("delta", {}).get("content") for choice in event.get("choices", ()))
