"""What ``--state redis://`` adds to a request over ``memory://`` (issue 11), in one run.

Usage: ``./scripts/bench shared-state [--seconds 4] [--rounds 2] [--write]``.

Two balancers run side by side against one fast fake llama.cpp (``fast_upstream``: 2 servers
of 512 slots, simulated agents reporting to each balancer): one keeps its fleet in memory, the
other in a real ``redis-server`` (Debian's, started here on a Unix socket, nothing saved). They
take turns cell by cell, the order rotating, so that the shared machine's drift spreads over
both:

- paced streams at 1, 16 and 64 streams (``paced_streams``): the time to the first event, whose
  difference between the two is what a reservation through Redis adds (issue 11's target: at
  most 1 ms at p50);
- small requests from wrk at 1 connection (latency) and at 32 (CPU per request: the
  balancer's, and Redis's, read from ``/proc``).

With ``--write`` it replaces its section of docs/benchmarks.md (between
``<!-- shared-state:begin -->`` and ``<!-- shared-state:end -->``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bench.environment import hardware
from bench.processes import spawn, stop
from bench.routing_report import write_section
from bench.runner import say
from bench.scale_contestants import SMALL_BODY
from bench.scale_measure import Meter, stream_cell, wrk_cell
from bench.simulated_fleet import running_fleet, running_upstream
from bench.wrk import lua_script

BEGIN = "<!-- shared-state:begin -->"
END = "<!-- shared-state:end -->"
ROOT = Path(__file__).resolve().parent.parent
CONTESTANTS = ("memory", "redis")
STREAM_COUNTS = (1, 16, 64)
STREAM_BODY = {
    "prompt": "Say hi",
    "n_predict": 20,
    "stream": True,
    "bench_first_ms": 10,
    "bench_interval_ms": 10,
}


@contextlib.asynccontextmanager
async def running_redis(workdir: Path) -> AsyncIterator[tuple[str, int]]:
    """A ``redis-server`` on a Unix socket in ``workdir``; its URL and pid."""
    binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
    socket_path = workdir / "redis.sock"
    process = await spawn(
        binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        log_path=workdir / "redis.log",
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            while not socket_path.exists():
                if process.returncode is not None:
                    raise RuntimeError(f"redis-server exited with {process.returncode}")
                await asyncio.sleep(0.02)
        yield f"unix://{socket_path}", process.pid
    finally:
        await stop(process)


def _rotated(turn: int) -> Sequence[str]:
    return CONTESTANTS[turn % 2 :] + CONTESTANTS[: turn % 2]


async def measure(seconds: float, rounds: int, workdir: Path) -> str:
    load_before = os.getloadavg()[0]
    flags = ["--max-client-connections=4096"]
    async with (
        running_upstream(2, 512, workdir, "fast-upstream-shared") as upstream,
        running_redis(workdir) as (redis_url, redis_pid),
        running_fleet(upstream, 2, workdir, flags, name="memory") as memory,
        running_fleet(upstream, 2, workdir, [*flags, f"--state={redis_url}"], name="redis") as shared,
    ):  # fmt: skip
        fleets = {"memory": memory, "redis": shared}
        meters = {
            name: Meter(
                {"proxy": fleet.paddler.balancer_pid, "redis": redis_pid, "upstream": upstream.child.pid}
            )
            for name, fleet in fleets.items()
        }  # fmt: skip
        small = workdir / "small.lua"
        small.write_text(lua_script("/completion", SMALL_BODY))
        ttft: dict[tuple[str, int], list[float]] = {}
        latency: dict[str, list[float]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}
        for name in CONTESTANTS:  # warm-up: pools filled, scripts loaded, code paths hot
            await wrk_cell(
                meters[name], name, "warm-up", fleets[name].paddler.proxy_url, small, 32, 1.0
            )
        turn = 0
        for round_number in range(rounds):
            for streams in STREAM_COUNTS:
                for name in _rotated(turn):
                    cell = await stream_cell(
                        meters[name], name, fleets[name].paddler.proxy_url, STREAM_BODY,
                        streams=streams, seconds=seconds, warmup=0.5, spread=0.21,
                    )  # fmt: skip
                    ttft.setdefault((name, streams), []).append(cell.ttft_p50)
                    say(
                        f"round {round_number + 1}, {streams} streams, {name}: TTFT p50 {cell.ttft_p50 * 1000:.2f} ms"
                    )
                turn += 1
            for connections in (1, 32):
                for name in _rotated(turn):
                    load = await wrk_cell(
                        meters[name], name, "small", fleets[name].paddler.proxy_url, small,
                        connections, seconds,
                    )  # fmt: skip
                    if connections == 1:
                        latency.setdefault(name, []).append(load.p50)
                    else:
                        cpu.setdefault(name, []).append(
                            (load.proxy_ms_per_request, load.ms_per("redis", load.requests))
                        )
                    say(
                        f"round {round_number + 1}, small at {connections}, {name}: p50 {load.p50 * 1000:.2f} ms, {load.requests_per_second:.0f} req/s"
                    )
                turn += 1
    return _report(ttft, latency, cpu, seconds, rounds, load_before)


def _report(
    ttft: dict[tuple[str, int], list[float]],
    latency: dict[str, list[float]],
    cpu: dict[str, list[tuple[float, float]]],
    seconds: float,
    rounds: int,
    load_before: float,
) -> str:
    def ms(value: float) -> str:
        return f"{value * 1000:.2f}"

    rows = [
        "| measure | memory:// | redis:// | added by Redis | target |",
        "|---|---:|---:|---:|---|",
    ]
    for streams in STREAM_COUNTS:
        base = statistics.median(ttft[("memory", streams)])
        shared = statistics.median(ttft[("redis", streams)])
        rows.append(
            f"| TTFT p50 at {streams} stream(s) (ms) | {ms(base)} | {ms(shared)} "
            f"| {(shared - base) * 1000:+.2f} | ≤ +1 ms |"
        )
    base, shared = statistics.median(latency["memory"]), statistics.median(latency["redis"])
    rows.append(
        f"| small request p50 at 1 connection (ms) | {ms(base)} | {ms(shared)} "
        f"| {(shared - base) * 1000:+.2f} | ≤ +1 ms |"
    )
    balancer = {name: statistics.median(value[0] for value in cpu[name]) for name in CONTESTANTS}
    redis_cpu = statistics.median(value[1] for value in cpu["redis"])
    rows.append(
        f"| balancer CPU per small request at 32 connections (ms) | {balancer['memory']:.3f} "
        f"| {balancer['redis']:.3f} | {balancer['redis'] - balancer['memory']:+.3f} | - |"
    )
    rows.append(
        f"| redis-server CPU per small request (ms) | - | {redis_cpu:.3f} | {redis_cpu:+.3f} | - |"
    )
    machine = hardware(load_before)
    command = " ".join(["./scripts/bench shared-state", *sys.argv[1:]])
    return f"""## What a shared state adds to a request (issue 11)

Written by `{command}` on {machine.cpus} CPUs ({machine.cpu_model}, shared with other work;
load average {machine.load_before:.2f} at the start): medians of {rounds} rotating rounds of
{seconds:g} s cells. Two balancers side by side on one fast fake llama.cpp (2 servers of 512
slots, simulated agents): one with `--state memory://`, one with `--state` on a real
`redis-server` (a Unix socket on the same machine, nothing saved). Paced streams: {STREAM_BODY["n_predict"]}
events, the first after {STREAM_BODY["bench_first_ms"]} ms; small requests from wrk
(`POST /completion`, `n_predict` 1). "added by Redis" is redis:// minus memory://: a
reservation is one script on Redis (and a release another, after the answer).

{chr(10).join(rows)}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./scripts/bench shared-state", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--write", action="store_true", help="replace the section in docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as directory:
        text = asyncio.run(measure(args.seconds, args.rounds, Path(directory)))
    print(text)
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", text, BEGIN, END)


if __name__ == "__main__":
    main()
