"""What Paddler adds to time-to-first-token and total latency, next to nginx and to no proxy.

Usage: ``./scripts/bench [--quick] [--concurrency 1,16,64] [--requests N] [--output PATH]``
(or ``python -m bench.overhead`` inside the venv). ``--help`` lists every flag.

This is the command-line layer: it reads the flags, owns the child processes through context
managers (so that every one is stopped, whatever happens) and turns SIGTERM into cancellation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.config import BenchConfig
from bench.contestants import Contestant, running_contestants
from bench.cpu import CpuParties
from bench.environment import hardware, versions
from bench.llamacpp import Backend, props, running_backends
from bench.load import Prompts, client_session, run_closed_loop
from bench.nginx import nginx_version
from bench.queue_watch import watching_queues
from bench.report import Report, markdown_document, tables, write_json
from bench.routing_report import marked_sections
from bench.runner import run, say
from bench.stats import Cell, RunOutcome

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("docs/benchmarks.md")


def parse_args(argv: Sequence[str]) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench",
        description="Measure the TTFT and total latency that Paddler (and nginx, for reference) "
        "add over talking to llama.cpp directly.",
    )
    parser.add_argument("--quick", action="store_true", help="few requests: a smoke run")
    parser.add_argument(
        "--concurrency",
        default="1,16,64",
        help="comma-separated numbers of concurrent streams (default: %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per cell, over all rounds (default: 800, or 64 with --quick)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per cell (default: 4, or 1 with --quick)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"Markdown report to write (default: {DEFAULT_OUTPUT}; none with --quick)",
    )
    parser.add_argument("--n-predict", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--servers", type=int, default=1, help="llama.cpp servers")
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="slots per server (default: the highest concurrency spread over the servers)",
    )
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the processes' logs in bench/results/ (they are kept anyway on failure)",
    )
    args = parser.parse_args(argv)
    try:
        concurrency = tuple(int(level) for level in args.concurrency.split(",") if level.strip())
    except ValueError:
        parser.error(f"--concurrency wants numbers such as 1,16,64, not {args.concurrency!r}")
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency needs at least one number, each 1 or more")
    requests = args.requests or (64 if args.quick else 800)
    rounds = args.rounds or (1 if args.quick else 4)
    if requests < rounds:
        parser.error("--requests must be at least --rounds")
    output = args.output
    if output is None and not args.quick:
        output = DEFAULT_OUTPUT
    return BenchConfig(
        concurrency=concurrency,
        requests=requests,
        rounds=rounds,
        n_predict=args.n_predict,
        servers=args.servers,
        slots=args.slots or -(-max(concurrency) // args.servers),
        threads=args.threads,
        poll_interval=0.05,
        output=output,
        results_dir=ROOT / "bench" / "results",
        quick=args.quick,
        keep_logs=args.keep_logs,
        disturbance_limit=0.25,
        disturbed_retries=2,
        command=shlex.join(["./scripts/bench", *argv]),
    )


async def measure(
    config: BenchConfig,
    session: aiohttp.ClientSession,
    poll_session: aiohttp.ClientSession,
    backends: list[Backend],
    contestants: list[Contestant],
) -> list[Cell]:
    """Every cell, concurrency by concurrency, the contestants taking turns within each round."""
    prompts = Prompts()
    cells: list[Cell] = []
    for concurrency in config.concurrency:
        row = {contestant.name: Cell(contestant.name, concurrency) for contestant in contestants}
        for round_index in range(config.rounds):
            shift = round_index % len(contestants)
            for contestant in contestants[shift:] + contestants[:shift]:
                cell = row[contestant.name]
                label = (
                    f"{concurrency:>3} streams, round {round_index + 1}/{config.rounds}, "
                    f"{contestant.name:<8}"
                )
                for attempt in range(config.disturbed_retries + 1):
                    prompts_for_run = prompts.take(
                        config.warmup_requests(concurrency)
                        + config.requests_in_round(round_index)
                        + config.cooldown_requests(concurrency)
                    )
                    outcome = await measure_run(
                        config, session, poll_session, backends, contestant, cell, prompts_for_run
                    )
                    if (
                        outcome.other_cores <= config.disturbance_limit
                        or attempt == config.disturbed_retries
                    ):
                        break
                    cell.repeated_runs += 1
                    say(
                        f"  {label} other processes took {outcome.other_cores:.2f} CPUs: "
                        "measuring it again"
                    )
                cell.add(outcome)
                run = outcome.run
                failed = sum(not sample.ok for sample in run.samples)
                say(
                    f"  {label} {len(run.samples)} requests in {run.wall:.2f} s"
                    + (f", {failed} failed" if failed else "")
                )
        cells += row.values()
    return cells


async def measure_run(
    config: BenchConfig,
    session: aiohttp.ClientSession,
    poll_session: aiohttp.ClientSession,
    backends: list[Backend],
    contestant: Contestant,
    cell: Cell,
    prompts: list[str],
) -> RunOutcome:
    """One closed-loop run of ``contestant``, its queues watched and its CPU time counted."""
    warmup = config.warmup_requests(cell.concurrency)
    measured = range(warmup, len(prompts) - config.cooldown_requests(cell.concurrency))
    parties = CpuParties(
        {"proxy": contestant.proxy_pids, "llamacpp": tuple(backend.pid for backend in backends)}
    )
    cpu_before = parties.snapshot()
    started = time.perf_counter()
    async with watching_queues(
        poll_session, backends, contestant.paddler, config.poll_interval
    ) as queue_samples:
        run = await run_closed_loop(
            session, contestant, prompts, cell.concurrency, config.n_predict, measured
        )
    elapsed = time.perf_counter() - started
    cpu = CpuParties.used(cpu_before, parties.snapshot())
    return RunOutcome(
        run=run,
        queue_samples=queue_samples,
        cpu_seconds=cpu.parties,
        requests_sent=len(prompts),
        other_cores=cpu.other / elapsed if elapsed > 0 else 0.0,
        stolen_cores=cpu.stolen / elapsed if elapsed > 0 else 0.0,
    )


async def benchmark(config: BenchConfig, workdir: Path, started_at: str, stamp: str) -> int:
    """Run everything, children's logs in ``workdir``; return the exit status."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    async with contextlib.AsyncExitStack() as stack:
        say(f"starting {config.servers} llama.cpp server(s) with {config.slots} slots")
        backends = await stack.enter_async_context(running_backends(config.backends, workdir))
        say("starting nginx and Paddler (balancer and agents)")
        contestants = await stack.enter_async_context(
            running_contestants(config, backends, workdir)
        )
        session = await stack.enter_async_context(client_session(max(config.concurrency)))
        poll_session = await stack.enter_async_context(aiohttp.ClientSession())
        server_props = await props(poll_session, backends[0])
        say(f"measuring: {config.command}")
        cells = await measure(config, session, poll_session, backends, contestants)
    report = Report(
        config=config,
        started_at=started_at,
        duration_seconds=time.monotonic() - started,
        hardware=hardware(load_before),
        versions=versions(server_props, await nginx_version()),
        cells=[cell.stats() for cell in cells],
    )
    write_outputs(report, cells, stamp)
    return 1 if any(cell.errors for cell in report.cells) else 0


def write_outputs(report: Report, cells: list[Cell], stamp: str) -> None:
    config = report.config
    json_path = config.results_dir / f"overhead-{stamp}.json"
    write_json(report, cells, json_path)
    print(tables(report), flush=True)
    say(f"raw results: {json_path}")
    if config.output is not None:
        config.output.parent.mkdir(parents=True, exist_ok=True)
        # The other benchmarks' sections of the same document are kept as they are.
        existing = config.output.read_text() if config.output.exists() else ""
        kept = "".join(f"\n{section}\n" for section in marked_sections(existing))
        config.output.write_text(markdown_document(report) + kept)
        say(f"report: {config.output}")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    run(
        lambda workdir, started_at, stamp: benchmark(config, workdir, started_at, stamp),
        name="overhead",
        results_dir=config.results_dir,
        keep_logs=config.keep_logs,
    )


if __name__ == "__main__":
    main()
