"""Does prefix-cache-aware routing win? Five ways of balancing the same llama.cpp servers.

Usage: ``./scripts/bench routing [--quick] [--workloads chat,independent,mixed] [--rates-chat
0.5,1,2] [--seed N] ...`` (or ``python -m bench.routing`` inside the venv). ``--help`` lists
every flag.

Every workload is generated in full from the seed before anything runs (``bench.workloads``),
the servers' prompt caches are sized from it (``bench.cache_sizing``), and then for each
workload and offered load every contestant in turn gets the identical open-loop run against
llama.cpp servers started fresh for it, so that no contestant inherits another one's cache.

This is the command-line layer: it reads the flags, owns the child processes through context
managers (so that every one is stopped, whatever happens) and turns SIGTERM into cancellation.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp

from bench.cache_sizing import size_cache
from bench.cpu import CpuParties
from bench.environment import hardware, versions
from bench.llamacpp import props, running_backends
from bench.load import client_session
from bench.nginx import nginx_version
from bench.open_loop import run_open_loop
from bench.paddler import prometheus_text
from bench.queue_watch import watching_queues
from bench.routing_config import MODEL, RoutingConfig
from bench.routing_contestants import CONTESTANTS, running_contestant
from bench.routing_report import RoutingReport, write_outputs
from bench.routing_stats import RunStats, run_stats, scraped_metrics
from bench.runner import run, say
from bench.workloads import WORKLOADS, ChatRequest, ChatShape, IndependentShape, MixedShape
from bench.workloads import generate as generate_workload

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("docs/benchmarks.md")
DEFAULT_PLOT = Path("docs/routing-ttft.png")
DEFAULT_RATES = {"chat": "1,2,3,4", "independent": "1,2.5", "mixed": "4,8,12"}
QUICK_RATES = {"chat": "2.5", "independent": "1.5", "mixed": "8"}
DEFAULT_REQUESTS = {"chat": 80, "independent": 32, "mixed": 64}
QUICK_REQUESTS = {"chat": 32, "independent": 10, "mixed": 16}


def _rates(text: str, parser: argparse.ArgumentParser, flag: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(rate) for rate in text.split(",") if rate.strip())
    except ValueError:
        parser.error(f"{flag} wants numbers such as 0.5,1,2, not {text!r}")
    if not rates or min(rates) <= 0:
        parser.error(f"{flag} needs at least one rate, each above 0")
    return rates


def parse_args(argv: Sequence[str]) -> RoutingConfig:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench routing",
        description="Compare direct, nginx round robin, nginx least_conn, Paddler by slots and "
        "Paddler by prefix on the same llama.cpp servers under open-loop load, and write the "
        "routing section of docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    parser.add_argument("--seed", type=int, default=1, help="seed of every workload")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated, of: %(default)s (that is (a), (b) and (c))",
    )
    for workload in WORKLOADS:
        parser.add_argument(
            f"--rates-{workload}",
            default=None,
            help=f"offered loads of {workload}, requests/s (default: {DEFAULT_RATES[workload]}"
            f", or {QUICK_RATES[workload]} with --quick)",
        )
        parser.add_argument(
            f"--requests-{workload}",
            type=int,
            default=None,
            help=f"requests per run of {workload} (default: {DEFAULT_REQUESTS[workload]}, or "
            f"{QUICK_REQUESTS[workload]} with --quick)",
        )
    parser.add_argument(
        "--contestants", default=",".join(CONTESTANTS), help="comma-separated, of: %(default)s"
    )
    parser.add_argument(
        "--servers", type=int, default=4, help="llama.cpp servers, 2 to 4 (default: %(default)s)"
    )
    parser.add_argument("--slots", type=int, default=4, help="slots per server")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server")
    parser.add_argument("--lanes", type=int, default=16, help="(a): chat sessions at a time")
    parser.add_argument("--turns", type=int, default=6, help="(a): turns per chat session")
    parser.add_argument(
        "--cache-ram-mib",
        type=int,
        default=None,
        help="each server's prompt cache (default: sized from workload (a), see the report)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a request may take, queueing included (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"Markdown report whose routing section to write (default: {DEFAULT_OUTPUT}; "
        "none with --quick)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help=f"PNG of TTFT against offered load (default: {DEFAULT_PLOT} when there is an "
        "--output)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the processes' logs in bench/results/ (they are kept anyway on failure)",
    )
    args = parser.parse_args(argv)
    workloads = tuple(name.strip() for name in args.workloads.split(",") if name.strip())
    contestants = tuple(name.strip() for name in args.contestants.split(",") if name.strip())
    if not workloads or not set(workloads) <= set(WORKLOADS):
        parser.error(f"--workloads takes some of {', '.join(WORKLOADS)}")
    if not contestants or not set(contestants) <= set(CONTESTANTS):
        parser.error(f"--contestants takes some of {', '.join(CONTESTANTS)}")
    if not 2 <= args.servers <= 4:
        parser.error("--servers must be 2 to 4")
    if args.lanes < 4 or args.turns < 2 or args.slots < 1:
        parser.error("--lanes must be 4 or more, --turns 2 or more, --slots 1 or more")
    rates = {
        workload: _rates(
            getattr(args, f"rates_{workload}")
            or (QUICK_RATES if args.quick else DEFAULT_RATES)[workload],
            parser,
            f"--rates-{workload}",
        )
        for workload in workloads
    }
    requests = {
        workload: getattr(args, f"requests_{workload}")
        or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)[workload]
        for workload in workloads
    }
    output = args.output
    if output is None and not args.quick:
        output = DEFAULT_OUTPUT
    chat, independent, mixed = (
        ChatShape(lanes=args.lanes, turns=args.turns),
        IndependentShape(),
        MixedShape(),
    )
    # Sized from workload (a)'s shape, whether it runs or not and however long its runs are:
    # long enough for every lane to go through several sessions.
    steady = generate_workload("chat", args.seed, 4 * chat.lanes * chat.turns, 1.0, chat)
    sizing = size_cache(steady, chat.lanes, args.servers, MODEL)
    needed = max(shape.context_needed for shape in (chat, independent, mixed))
    return RoutingConfig(
        seed=args.seed,
        workloads=workloads,
        rates=rates,
        requests=requests,
        contestants=contestants,
        servers=args.servers,
        slots=args.slots,
        context_per_slot=-(-needed // 256) * 256,
        threads=args.threads,
        sizing=sizing,
        cache_ram_mib=sizing.cache_ram_mib if args.cache_ram_mib is None else args.cache_ram_mib,
        request_timeout=args.request_timeout,
        poll_interval=0.25,
        chat=chat,
        independent=independent,
        mixed=mixed,
        output=output,
        plot=args.plot or (DEFAULT_PLOT if output is not None else None),
        results_dir=ROOT / "bench" / "results",
        quick=args.quick,
        keep_logs=args.keep_logs,
        command=shlex.join(["./scripts/bench", "routing", *argv]),
    )


Plan = dict[tuple[str, float], list[ChatRequest]]


def plan(config: RoutingConfig) -> Plan:
    """Every run's requests, generated before the first one is sent."""
    return {
        (workload, rate): generate_workload(
            workload,
            config.seed,
            config.requests[workload],
            rate,
            config.chat,
            config.independent,
            config.mixed,
        )
        for workload in config.workloads
        for rate in config.rates[workload]
    }


async def measure(
    config: RoutingConfig, runs: Plan, session: aiohttp.ClientSession, workdir: Path
) -> list[RunStats]:
    """Every run, the contestants taking turns at each offered load (the order rotating)."""
    results: list[RunStats] = []
    poll_timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(timeout=poll_timeout) as poll_session:
        for number, ((workload, rate), requests) in enumerate(runs.items()):
            shift = number % len(config.contestants)
            for name in config.contestants[shift:] + config.contestants[:shift]:
                stats = await measure_run(
                    config, workload, rate, name, requests, session, poll_session, workdir
                )
                results.append(stats)
                say(
                    f"  {workload:<11} {rate:>5g} req/s  {name:<16} "
                    f"{stats.requests_per_second:5.2f} req/s done, TTFT p50 "
                    f"{stats.ttft.p50:6.2f} s p90 {stats.ttft.p90:6.2f} s, cache hits "
                    f"{stats.cache_hit_rate:4.0%}, {stats.errors} errors"
                )
    return results


async def measure_run(
    config: RoutingConfig,
    workload: str,
    rate: float,
    name: str,
    requests: list[ChatRequest],
    session: aiohttp.ClientSession,
    poll_session: aiohttp.ClientSession,
    workdir: Path,
) -> RunStats:
    """One open-loop run of contestant ``name``, on llama.cpp servers started for it."""
    run_dir = workdir / f"{workload}-{rate:g}-{name}"
    run_dir.mkdir()
    # nginx's workers run as "nobody" and must reach their directory below this one.
    run_dir.chmod(0o755)
    async with (
        running_backends(config.backends, run_dir) as backends,
        running_contestant(
            name, backends, config.slots, run_dir, config.paddler_flags
        ) as contestant,
    ):
        parties = CpuParties({"llamacpp": tuple(backend.pid for backend in backends)})
        cpu_before = parties.snapshot()
        started = time.perf_counter()
        async with watching_queues(
            poll_session, backends, contestant.paddler, config.poll_interval
        ) as queue_samples:
            run = await run_open_loop(session, contestant, requests, config.request_timeout)
        elapsed = time.perf_counter() - started
        other = CpuParties.used(cpu_before, parties.snapshot()).other
        paddler_metrics = ""
        if contestant.paddler is not None:
            paddler_metrics = scraped_metrics(
                await prometheus_text(poll_session, contestant.paddler)
            )
    return run_stats(
        workload,
        rate,
        name,
        run,
        list(queue_samples),
        other / elapsed if elapsed > 0 else 0.0,
        paddler_metrics,
    )


async def benchmark(config: RoutingConfig, workdir: Path, started_at: str, stamp: str) -> int:
    """Run everything, children's logs in ``workdir``; return the exit status."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    runs = plan(config)
    say(config.sizing.explain())
    say(
        f"{len(runs) * len(config.contestants)} runs; each on {config.servers} fresh llama.cpp "
        f"servers ({config.slots} slots of {config.context_per_slot} tokens, --cache-ram "
        f"{config.cache_ram_mib} MiB)"
    )
    async with (
        running_backends(replace(config.backends, servers=1), workdir) as backends,
        aiohttp.ClientSession() as poll_session,
    ):
        server_props = await props(poll_session, backends[0])
    most = max(len(requests) for requests in runs.values())
    async with client_session(most, read_timeout=config.request_timeout) as session:
        say(f"measuring: {config.command}")
        results = await measure(config, runs, session, workdir)
    report = RoutingReport(
        config=config,
        started_at=started_at,
        duration_seconds=time.monotonic() - started,
        hardware=hardware(load_before),
        versions=versions(server_props, await nginx_version()),
        runs=results,
    )
    write_outputs(report, stamp, say)
    return 1 if any(stats.errors for stats in results) else 0


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    run(
        lambda workdir, started_at, stamp: benchmark(config, workdir, started_at, stamp),
        name="routing",
        results_dir=config.results_dir,
        keep_logs=config.keep_logs,
    )


if __name__ == "__main__":
    main()
