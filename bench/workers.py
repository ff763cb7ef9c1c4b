"""``--workers``: throughput and CPU per request at 1, 2 and 4 workers, beside direct and nginx.

Usage: ``python -m bench.workers [--seconds S] [--rounds R] [--connections C] [--workers 1,2,4]
[--write]`` (``./scripts/bench workers``). One fast upstream (``fast_upstream``: 4 simulated
llama.cpp servers of 64 slots) serves every contestant, all running at once: direct, nginx
(``worker_processes`` as many as the machine's cores), and one Paddler per worker count, each
with 4 simulated agents. Cells are wrk's small requests (``POST /completion``, ``n_predict`` 1)
at ``--connections``, taking turns, the order rotating each round. CPU is read from ``/proc``:
the proxy's whole process tree (the fleet host, its workers and their traits workers), and the
fleet host alone, which is the part that does not grow with the workers. wrk's own CPU and the
machine's idle share say whether the load generator or the machine ran out first.

``--write`` puts the table into docs/benchmarks.md (section ``workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import own_and_tree_seconds
from bench.nginx import running_nginx
from bench.runner import say
from bench.scale_measure import LoadCell, Meter, wrk_cell
from bench.simulated_fleet import running_fleet, running_upstream
from bench.wrk import lua_script

SERVERS = 4
SLOTS = 64
SMALL_BODY = {"prompt": "Say hi", "n_predict": 1}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
NONE, TIMES = "\u2013", "\u00d7"  # an en dash, a multiplication sign
BEGIN, END = "<!-- workers:begin -->", "<!-- workers:end -->"


@dataclass
class Cells:
    cells: list[LoadCell] = field(default_factory=list)
    host_seconds: list[float] = field(default_factory=list)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Cells]:
    counts = [int(count) for count in args.workers.split(",")]
    names = ["direct", "nginx", *(f"paddler-{count}w" for count in counts)]
    results = {name: Cells() for name in names}
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(
            running_upstream(SERVERS, SLOTS, workdir, "fast-upstream-workers")
        )
        nginx = await stack.enter_async_context(running_nginx(upstream.backends(SERVERS), workdir))
        urls = {"direct": upstream.url(0), "nginx": nginx.url}
        proxies = {"nginx": nginx.pid}
        for count in counts:
            fleet = await stack.enter_async_context(
                running_fleet(
                    upstream,
                    SERVERS,
                    workdir,
                    [f"--workers={count}", "--max-client-connections=4096", "--no-agent-header"],
                    name=f"paddler-{count}w",
                )
            )
            urls[f"paddler-{count}w"] = fleet.paddler.proxy_url
            proxies[f"paddler-{count}w"] = fleet.paddler.balancer_pid
        meters = {
            name: Meter({"upstream": upstream.child.pid} | ({"proxy": proxies[name]} if name in proxies else {}))
            for name in names
        }  # fmt: skip
        script = workdir / "small.lua"
        script.write_text(lua_script("/completion", SMALL_BODY))
        for name in names:  # warm-up: pools filled, code paths hot
            await wrk_cell(meters[name], name, "warm-up", urls[name], script, args.connections, 1.0)
        for turn in range(args.rounds):
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                host_before = own_and_tree_seconds(proxies[name])[0] if name in proxies else 0.0
                cell = await wrk_cell(
                    meters[name], name, "load", urls[name], script, args.connections, args.seconds
                )
                host = (
                    own_and_tree_seconds(proxies[name])[0] - host_before if name in proxies else 0.0
                )
                results[name].cells.append(cell)
                results[name].host_seconds.append(host)
                say(
                    f"round {turn + 1} {name}: {cell.requests_per_second:.0f} req/s, p50 "
                    f"{cell.p50 * 1000:.2f} ms, proxy {cell.proxy_ms_per_request:.3f} ms CPU/request "
                    f"({cell.usage.cores('proxy'):.2f} cores), errors {cell.errors or 0}"
                )  # fmt: skip
    return results


def table(results: dict[str, Cells]) -> str:
    def median_of(name: str, value: Callable[[LoadCell], float]) -> float:
        return statistics.median(value(cell) for cell in results[name].cells)

    base = next((name for name in results if name == "paddler-1w"), None)
    base_rps = median_of(base, lambda c: c.requests_per_second) if base else float("nan")
    cores = os.cpu_count() or 1
    lines = [
        f"| contestant | req/s | {TIMES} 1 worker | p50 | p99 | proxy CPU per request | proxy cores | "
        "fleet host CPU per request | wrk cores | machine idle (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cells in results.items():
        paddler = name.startswith("paddler")
        proxied = paddler or name == "nginx"
        rps = median_of(name, lambda c: c.requests_per_second)
        host = statistics.median(
            seconds / cell.requests * 1000 if cell.requests else 0.0
            for seconds, cell in zip(cells.host_seconds, cells.cells, strict=True)
        )
        idle = median_of(
            name,
            lambda c: max(0.0, cores - (sum(c.usage.cpu.values()) + c.usage.other) / c.usage.wall),
        )
        row = [
            name,
            f"{rps:,.0f}",
            f"{rps / base_rps:.2f}{TIMES}" if paddler else NONE,
            f"{median_of(name, lambda c: c.p50) * 1000:.2f} ms",
            f"{median_of(name, lambda c: c.p99) * 1000:.2f} ms",
            f"{median_of(name, lambda c: c.proxy_ms_per_request):.3f} ms" if proxied else NONE,
            f"{median_of(name, lambda c: c.usage.cores('proxy')):.2f}" if proxied else NONE,
            f"{host:.3f} ms" if paddler else NONE,
            f"{median_of(name, lambda c: c.usage.cores('wrk')):.2f}",
            f"{idle:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_docs(text: str, args: argparse.Namespace) -> None:
    command = (
        f"./scripts/bench workers --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--connections {args.connections} --workers {args.workers} --write"
    )
    section = (
        f"{BEGIN}\n## Workers: one port, several processes (issue 10)\n\n"
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores (shared), "
        f"medians of {args.rounds} rotating rounds of {args.seconds:g} s each. "
        f"Small requests from wrk at {args.connections} connections to a fast fake llama.cpp "
        f'({SERVERS} servers of {SLOTS} slots; 4 simulated agents per Paddler). "proxy CPU" is '
        "the proxy's whole process tree (for Paddler: the fleet host, its workers and their "
        'traits workers); "fleet host" is the balancer\'s own process alone, which answers '
        "every worker's reservations.\n\n"
        f"{text}\n{END}"
    )
    current = DOCS.read_text()
    if BEGIN in current:
        head, rest = current.split(BEGIN, 1)
        current = head + section + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, between commas")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="paddler-bench-workers-") as directory:
        results = asyncio.run(measure(args, Path(directory)))
    text = table(results)
    print(text)
    if args.write:
        write_docs(text, args)


if __name__ == "__main__":
    main()
