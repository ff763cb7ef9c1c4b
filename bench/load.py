"""The load generator: closed-loop streams of streaming ``/completion`` requests.

``concurrency`` workers each send one request, read its stream to the end, and send the next,
until the run's requests are used up; only the requests in the middle of a run are measured.
Every request has a prompt of its own, all of the same length, so that no contestant benefits
from another one's prompt cache and each one's prefill costs the same.

Time to first token (TTFT) runs from just before the request is sent to the first SSE event that
carries a token; total latency runs to the end of the response body. (With the tiny model's byte
tokens, the first event sometimes carries the first two tokens: llama.cpp does not send a token
that ends inside a UTF-8 sequence on its own. That happens alike whatever the path.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.contestants import Contestant

ROUTE = "/completion"
_HEADERS = {"Content-Type": "application/json"}
_HEADERS_CLOSE = {**_HEADERS, "Connection": "close"}
_DATA = b"data: "


@dataclass(frozen=True)
class Sample:
    ttft: float | None
    total: float | None
    tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Run:
    samples: list[Sample]
    """The measured requests only."""
    window_start: float
    """``time.perf_counter()`` when the first measured request started."""
    window_end: float
    """When the first request after the measured ones started (or the run ended)."""
    unmeasured_errors: tuple[str, ...] = ()
    """Failures among the warm-up and cool-down requests."""

    @property
    def wall(self) -> float:
        return self.window_end - self.window_start


class Prompts:
    """Unique prompts of one length; numbered across the whole benchmark, never reused."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def take(self, count: int) -> list[str]:
        return [self._prompt(next(self._numbers)) for _ in range(count)]

    @staticmethod
    def _prompt(number: int) -> str:
        return f"Request {number:07d}: write a short poem about the number {number * 7919 % 10000:04d}."


def request_body(prompt: str, n_predict: int) -> bytes:
    # cache_prompt stays at llama.cpp's default (on), as real clients leave it.
    return json.dumps(
        {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True, "stream": True}
    ).encode()


def staggered_lengths(count: int, concurrency: int, n_predict: int) -> list[int]:
    """``n_predict`` for each request of a run: the first request of each stream is shorter.

    Streams that all start at once and all ask for the same number of tokens would stay in
    lockstep for ever: llama.cpp decodes them in the same batches, they end together and send
    their next requests together, so every request would arrive in a burst. Giving the first
    request of stream ``k`` about ``(k + 1) / concurrency`` of the tokens spreads the streams
    evenly over a request's length, and they keep that spread from then on.
    """
    first = [max(1, round((k + 1) * n_predict / concurrency)) for k in range(concurrency)]
    return [first[index] if index < concurrency else n_predict for index in range(count)]


def client_session(max_concurrency: int, read_timeout: float = 30.0) -> aiohttp.ClientSession:
    """The one client session of the benchmark, shared by every contestant.

    ``read_timeout`` bounds the wait for any single read, headers included: a request that
    waits in a queue gets no byte until it has a slot.
    """
    connector = aiohttp.TCPConnector(
        limit=4 * max_concurrency + 16,
        # Connections are not carried from one run to the next (the other contestants' runs
        # last longer than this): each run opens its own while it warms up.
        keepalive_timeout=2.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Per phase, never in total; still bounded, so that a stuck stream cannot hang the run.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=read_timeout),
    )


async def run_closed_loop(
    session: aiohttp.ClientSession,
    contestant: Contestant,
    prompts: Sequence[str],
    concurrency: int,
    n_predict: int,
    measured: range,
) -> Run:
    """Send every prompt through ``concurrency`` streams; measure the requests in ``measured``.

    The requests before ``measured`` warm up (connections open, the streams spread out, see
    ``staggered_lengths``) and those after it keep every stream busy until the last measured one
    ends, so that the measured requests all see the same steady load. Requests start in index
    order, so the rate is the measured count over the time from the first measured start to
    the next start.
    """
    assert measured.start >= concurrency, "the staggered first requests must not be measured"
    lengths = staggered_lengths(len(prompts), concurrency, n_predict)
    bodies = [request_body(prompt, length) for prompt, length in zip(prompts, lengths, strict=True)]
    samples: list[Sample | None] = [None] * len(bodies)
    starts = [0.0] * len(bodies)
    indexes = iter(range(len(bodies)))
    headers = _HEADERS_CLOSE if contestant.fresh_connections else _HEADERS

    async def worker() -> None:
        for index in indexes:
            url = contestant.url_for(index) + ROUTE
            starts[index] = time.perf_counter()
            samples[index] = await stream_one(session, url, bodies[index], lengths[index], headers)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(bodies))):
            group.create_task(worker())
    ended = time.perf_counter()
    unmeasured = samples[: measured.start] + samples[measured.stop :]
    return Run(
        [sample for sample in samples[measured.start : measured.stop] if sample is not None],
        window_start=starts[measured.start],
        window_end=starts[measured.stop] if measured.stop < len(bodies) else ended,
        unmeasured_errors=tuple(
            sample.error for sample in unmeasured if sample is not None and sample.error
        ),
    )


async def stream_one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    n_predict: int,
    headers: dict[str, str] = _HEADERS,
) -> Sample:
    """Send one streaming request and time it; any failure becomes a sample with an error."""
    started = time.perf_counter()
    first: float | None = None
    final: dict[str, Any] | None = None
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                return Sample(None, None, 0, f"HTTP {response.status}: {text}")
            async for line in response.content:
                if not line.startswith(_DATA):
                    continue
                # Only the first event and the last one are parsed: the client's own CPU time
                # is part of every measurement, and on a small machine it is not free.
                if first is None or b'"stop":true' in line:
                    event = json.loads(line[len(_DATA) :])
                    if "error" in event:
                        return Sample(None, None, 0, f"error event: {event['error']}")
                    if event.get("stop"):
                        final = event
                    # llama.cpp holds back a token that ends inside a UTF-8 sequence and sends
                    # it with the next one; a very short answer may come whole in the last event.
                    if first is None and (
                        event.get("tokens") or event.get("content") or final is not None
                    ):
                        first = time.perf_counter() - started
        total = time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as error:
        return Sample(None, None, 0, f"{type(error).__name__}: {error}")
    if final is None or first is None:
        return Sample(None, None, 0, "the stream ended without a token or without its last event")
    tokens = int(final.get("tokens_predicted", 0))
    if tokens != n_predict:
        return Sample(first, total, tokens, f"{tokens} tokens instead of {n_predict}")
    return Sample(first, total, tokens)
