"""The soak benchmark's clients: steady chats, disconnect storms and a slowloris.

- ``chat_client``: a closed loop of chat completions, streaming or not at random, each with a
  per-read timeout that is the hang detector: a request that receives no byte for
  ``hang_after`` seconds is counted as hung, not as an error, and abandoned.
- ``disconnect_storm``: many streams at once, each cancelled a random moment after its first
  byte, as clients that go away mid-answer.
- ``slowloris``: connections that send a request head one byte every few seconds and never
  finish it; the tally records how many the balancer closed and how soon.

Every outcome lands in one ``Tally``, by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

MODEL = "soak"
PROMPTS = (
    "Tell me a story about a lighthouse keeper.",
    "Summarise the plot of a film you like, in three sentences.",
    "List five uses for a paper clip.",
    "You are a helpful assistant. " * 20 + "What is the capital of France?",
)


@dataclass
class Tally:
    served: Counter[str] = field(default_factory=Counter)
    """Requests that ended normally, by kind (stream, plain)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Requests that ended otherwise, by what the client saw."""
    hung: int = 0
    cancelled: int = 0
    """Storm requests cancelled mid-stream, as planned."""
    slowloris_opened: int = 0
    slowloris_closed: list[float] = field(default_factory=list)
    """Seconds after opening at which the balancer closed each trickling connection."""
    slowloris_refused: int = 0
    latencies: list[float] = field(default_factory=list)


def chat_body(stream: bool) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": random.randint(8, 64),
        "stream": stream,
    }


async def one_chat(
    session: aiohttp.ClientSession, proxy: str, tally: Tally, hang_after: float
) -> None:
    stream = random.random() < 0.6
    kind = "stream" if stream else "plain"
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=hang_after)
    try:
        async with session.post(
            f"{proxy}/v1/chat/completions", json=chat_body(stream), timeout=timeout
        ) as response:
            if response.status != 200:
                await response.read()
                tally.errors[f"HTTP {response.status}"] += 1
                return
            if not stream:
                body = await response.json()
                if not body.get("choices"):
                    tally.errors["200 without choices"] += 1
                    return
            else:
                ending = await read_stream(response)
                if ending != "done":
                    tally.errors[ending] += 1
                    return
    except TimeoutError:
        tally.hung += 1
        return
    except (aiohttp.ClientError, ConnectionError) as error:
        tally.errors[type(error).__name__] += 1
        return
    tally.served[kind] += 1
    tally.latencies.append(time.monotonic() - started)


async def read_stream(response: aiohttp.ClientResponse) -> str:
    """How an SSE stream ended: ``done``, ``SSE error event`` or ``stream cut``."""
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return "done"
        with contextlib.suppress(ValueError):
            if "error" in json.loads(data):
                return "SSE error event"
    return "stream cut without [DONE]"


async def chat_client(
    session: aiohttp.ClientSession,
    proxy: str,
    tally: Tally,
    hang_after: float,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        await one_chat(session, proxy, tally, hang_after)


async def disconnect_storm(
    session: aiohttp.ClientSession, proxy: str, tally: Tally, size: int
) -> None:
    async def leaver() -> None:
        async with session.post(f"{proxy}/v1/chat/completions", json=chat_body(True)) as response:
            await response.content.readany()
            await asyncio.sleep(random.uniform(0.0, 0.3))
            response.close()  # mid-answer: the connection is closed, the client went away
            tally.cancelled += 1

    results = await asyncio.gather(
        *(asyncio.wait_for(leaver(), 30) for _ in range(size)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            tally.errors[f"storm: {type(result).__name__}"] += 1


async def slowloris(
    host: str, port: int, connections: int, tally: Tally, stop: asyncio.Event, every: float = 3.0
) -> None:
    """Keep ``connections`` request heads trickling until ``stop``; count the ones closed."""

    async def trickle(number: int) -> None:
        await asyncio.sleep(number * 0.01)  # spread the opening over a few seconds
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.slowloris_refused += 1
            return
        tally.slowloris_opened += 1
        opened = time.monotonic()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 100000
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):
                        # Anything from the balancer (an error status, or end of file) ends it.
                        await reader.read(1024)
                        raise ConnectionResetError
                if stop.is_set():
                    return
        except OSError:
            tally.slowloris_closed.append(time.monotonic() - opened)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async with asyncio.TaskGroup() as group:
        for number in range(connections):
            group.create_task(trickle(number))
