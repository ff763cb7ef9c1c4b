"""Does a large JSON body stall other requests? Issue 9's reproduction, on a real balancer.

Usage: ``./scripts/bench large-bodies [--output docs/benchmarks.md] [--keep-logs]`` (or ``python
-m bench.large_bodies`` inside the venv). For each ``--routing`` policy it starts a ``paddler
balancer`` process, and, in this process, two servers that answer instantly: one streams a
chunk every 10 ms, the other takes the large bodies (its fleet serves the model they name,
which comes after 30 MB of messages). Scripted agents register both. While a stream runs
through the balancer, 1 and then 4 bodies of two million small objects (about 30 MB each) are
sent at once, ``--rounds`` times each; the figure is the longest gap between the stream's
chunks while they are proxied, less the 10 ms the server waits between chunks (the median of
the rounds, and the worst). The CPU the balancer's own process spends per body, and its
traits worker's, come from ``/proc``.

It writes its section of ``docs/benchmarks.md`` between ``<!-- large-bodies:begin -->`` and
``<!-- large-bodies:end -->``; the "issue" column quotes what issue 9 measured before the fix.
Fakes are used for the servers because the point is the balancer's own event loop: a real
llama.cpp would spend seconds on a 30 MB prompt and make no stream of its own any faster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.cpu import own_and_tree_seconds
from bench.environment import hardware
from bench.paddler import running_balancer
from bench.routing_report import write_section
from bench.runner import run, say
from paddler import protocol
from paddler.protocol import LlamaCppState, Register, Status

BEGIN = "<!-- large-bodies:begin -->"
END = "<!-- large-bodies:end -->"
ROOT = Path(__file__).resolve().parents[1]
OBJECTS = 2_000_000
TICK = 0.01
CONCURRENCY = (1, 4)
ROUTINGS = ("prefix", "slots")
ISSUE = {1: "0.8 s", 4: "3.4 s"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def large_body() -> bytes:
    messages = b",".join([b'{"content":""}'] * OBJECTS)
    return b'{"messages":[' + messages + b'],"model":"large"}'


async def stream_or_answer(request: web.Request) -> web.StreamResponse:
    """Streams forever for ``/completion``; answers anything else at once, unread."""
    if request.path != "/completion":
        async for _ in request.content.iter_any():
            pass
        return web.json_response({"content": "ok"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        while True:
            await response.write(b'data: {"content":"x"}\n\n')
            await asyncio.sleep(TICK)
    return response


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def registered(
    session: aiohttp.ClientSession, management_url: str, name: str, port: int, model: str
) -> AsyncIterator[None]:
    """An agent for the server on ``port``, reporting 8 idle slots every second."""
    status = Status(state=LlamaCppState.OK, slots_idle=8, slots_processing=0, models=(model,))
    async with session.ws_connect(management_url + protocol.AGENT_SOCKET_PATH) as socket:
        await socket.send_str(
            protocol.encode(Register(name=name, host="127.0.0.1", port=port, status=status))
        )
        await socket.receive_str()

        async def report() -> None:
            while True:
                await asyncio.sleep(1.0)
                await socket.send_str(protocol.encode(status))

        reporting = asyncio.create_task(report())
        try:
            yield
        finally:
            reporting.cancel()
            await asyncio.wait([reporting])


async def longest_stall(
    session: aiohttp.ClientSession, proxy_url: str, body: bytes, bodies: int
) -> tuple[float, list[str]]:
    """The longest gap, in seconds, between a stream's chunks while ``bodies`` are proxied."""
    arrivals: list[float] = []
    async with session.post(
        f"{proxy_url}/completion", json={"model": "small", "prompt": "go", "stream": True}
    ) as stream:
        first = asyncio.Event()

        async def read() -> None:
            async for _ in stream.content.iter_any():
                arrivals.append(time.perf_counter())
                first.set()

        reader = asyncio.create_task(read())
        await first.wait()
        await asyncio.sleep(0.2)

        async def send() -> str:
            async with session.post(
                f"{proxy_url}/v1/chat/completions",
                data=io.BytesIO(body),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                return response.headers.get("X-Paddler-Agent", f"status {response.status}")

        began = len(arrivals)
        served_by = await asyncio.gather(*(send() for _ in range(bodies)))
        ended = len(arrivals)
        reader.cancel()
        await asyncio.wait([reader])
    during = arrivals[began - 1 : ended + 1]
    return max(b - a for a, b in itertools.pairwise(during)) - TICK, served_by


@dataclass
class Case:
    stalls: list[float] = field(default_factory=list)
    balancer_cpu: float = 0.0
    worker_cpu: float = 0.0
    bodies: int = 0


async def benchmark(output: Path | None, workdir: Path, rounds: int) -> int:
    load_before = os.getloadavg()[0]
    body = large_body()
    results: dict[tuple[str, int], Case] = {}
    misrouted = 0
    async with (
        aiohttp.ClientSession() as session,
        serving(stream_or_answer) as small_port,
        serving(stream_or_answer) as large_port,
    ):
        for routing in ROUTINGS:
            async with (
                running_balancer(workdir, f"--routing={routing}") as paddler,
                registered(session, paddler.management_url, "small", small_port, "small"),
                registered(session, paddler.management_url, "large", large_port, "large"),
            ):
                for bodies in CONCURRENCY:
                    case = results[routing, bodies] = Case()
                    for _ in range(rounds):
                        own, total = own_and_tree_seconds(paddler.balancer_pid)
                        stall, served_by = await longest_stall(
                            session, paddler.proxy_url, body, bodies
                        )
                        own_after, total_after = own_and_tree_seconds(paddler.balancer_pid)
                        case.stalls.append(stall)
                        case.balancer_cpu += own_after - own
                        case.worker_cpu += (total_after - own_after) - (total - own)
                        case.bodies += bodies
                        misrouted += sum(agent != "large" for agent in served_by)
                    say(
                        f"--routing {routing}, {bodies} at once: median "
                        f"{statistics.median(case.stalls) * 1000:.0f} ms, worst "
                        f"{max(case.stalls) * 1000:.0f} ms"
                    )
    text = section(results, len(body), load_before, misrouted, rounds)
    print(text, flush=True)
    if output is not None:
        write_section(output, text, BEGIN, END)
    return 0 if misrouted == 0 else 1


def section(
    results: dict[tuple[str, int], Case],
    size: int,
    load_before: float,
    misrouted: int,
    rounds: int,
) -> str:
    machine = hardware(load_before)
    rows = "\n".join(
        f"| `--routing {routing}` | {bodies} | {ISSUE[bodies]} "
        f"| {statistics.median(case.stalls) * 1000:.0f} ms | {max(case.stalls) * 1000:.0f} ms "
        f"| {case.balancer_cpu / case.bodies * 1000:.0f} ms | {case.worker_cpu / case.bodies * 1000:.0f} ms |"
        for routing in ROUTINGS
        for bodies in CONCURRENCY
        for case in [results[routing, bodies]]
    )
    return f"""## Does a large JSON body stall other requests? (issue 9)

`./scripts/bench large-bodies --rounds {rounds}`, on {machine.cpus} CPUs ({machine.cpu_model}),
{machine.memory_gib:.0f} GiB, load {load_before:.2f} before the run. A `paddler balancer`
process; a stream through it gets a chunk every 10 ms from a server that answers instantly,
while bodies of {OBJECTS:,} small JSON objects ({size / 1e6:.0f} MB, the model named after
them) are proxied to another. The figure is the longest wait for a stream chunk beyond those
10 ms (target: 50 ms), over {rounds} rounds: the median round and the worst. CPU per body: the
balancer's own process (its event loop), and its traits worker (the JSON parse, off the loop).
Bodies routed to a server without their model: {misrouted}.

| routing | bodies at once | issue | stall, median | stall, worst | balancer CPU per body | worker CPU per body |
|---|---|---|---|---|---|---|
{rows}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench large-bodies", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-output", action="store_true", help="print the section only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (5)")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    output = None if arguments.no_output else arguments.output
    run(
        lambda workdir, started_at, stamp: benchmark(output, workdir, arguments.rounds),
        name="large-bodies",
        results_dir=ROOT / "bench" / "results",
        keep_logs=arguments.keep_logs,
    )


if __name__ == "__main__":
    main()
