"""Thousands of requests held open at once, from a process of their own.

Usage: ``python -m bench.held_requests URL PATH BODY_JSON --count N`` (the scale benchmark starts
it; see ``child_control`` for the stdin/stdout contract). On ``start`` it opens ``N``
connections to ``URL`` (at most ``WINDOW`` connecting at a time, so that a proxy slow to accept
sees a steady queue rather than a storm of SYN retries) and POSTs ``BODY_JSON`` on each, with
``"seq"`` set to the order in which the requests were written (0, 1, ...). It then reads each
answer to its end: a ``Content-Length`` body, or a chunked event stream.

It serves two cells: the buffer sweep (non-streamed requests that wait in the balancer's buffer
until slots free up; ``seq`` lets the fast upstream check that they leave in order) and memory
per open stream (slow streams that stay open until ``close``).

Commands: ``start``; ``stats`` (how many were written, have their status line, their first
event, are done, failed, by status); ``close`` (ends every connection).
A process of its own, with the open-file limit raised, so that 10,000 sockets cost the probes
that time the balancer nothing, and so that its own CPU is counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.child_control import run_fast, serve_commands
from bench.processes import raise_open_file_limit

WINDOW = 100
"""Connections opening at once: below the balancer's listen backlog (aiohttp's 128), so that a
balancer that keeps accepting never has a SYN dropped."""


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    first_event: int = 0
    done: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        self.failed += 1
        if len(self.examples) < 5:
            self.examples.append(repr(error))

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "first_event": self.first_event,
            "done": self.done,
            "failed": self.failed,
            "statuses": {str(code): count for code, count in self.statuses.items()},
            "examples": self.examples,
        }


async def one(
    host: str, port: int, path: str, body: dict[str, Any], tally: Tally, window: asyncio.Semaphore
) -> None:
    writer: asyncio.StreamWriter | None = None
    try:
        async with window:
            reader, writer = await asyncio.open_connection(host, port)
            payload = json.dumps({**body, "seq": tally.sent}).encode()
            tally.sent += 1
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s"
                % (path.encode(), host.encode(), port, len(payload), payload)
            )
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        tally.answered += 1
        tally.statuses[int(head.split(b" ", 2)[1])] += 1
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            first = True
            while size := int((await reader.readline()).strip() or b"0", 16):
                await reader.readexactly(size + 2)
                if first:
                    tally.first_event += 1
                    first = False
            await reader.readline()
        else:
            length = 0
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
        tally.done += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
        tally.fail(error)
    finally:
        if writer is not None:
            writer.close()


async def main(url: str, path: str, body: dict[str, Any], count: int) -> None:
    raise_open_file_limit()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally = Tally()
    tasks: list[asyncio.Task[None]] = []
    window = asyncio.Semaphore(WINDOW)

    async def handle(command: str) -> dict[str, Any]:
        if command == "start":
            if tasks:
                raise ValueError("already started")
            # Created in order, and the semaphore wakes its waiters in order: seq follows.
            tasks.extend(
                asyncio.create_task(one(host, port, path, body, tally, window))
                for _ in range(count)
            )
            return {"started": count}
        if command == "stats":
            return tally.as_json()
        if command == "close":
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            return {"closed": len(tasks)}
        raise ValueError(f"unknown command {command!r}")

    print('{"ready": true}', flush=True)
    try:
        await serve_commands(handle)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.held_requests")
    parser.add_argument("url")
    parser.add_argument("path")
    parser.add_argument("body", type=json.loads)
    parser.add_argument("--count", type=int, required=True)
    arguments = parser.parse_args()
    run_fast(main(arguments.url, arguments.path, arguments.body, arguments.count))
