"""Soak: a real cluster under mixed load and chaos, for minutes, with its memory watched.

Usage: ``./scripts/bench soak [--duration 300] [--servers 3] [--clients 24] [--output ...]``
(or ``python -m bench.soak`` inside the venv). Not a CI gate: a run takes minutes.

It starts one ``paddler balancer`` and ``--servers`` ``paddler agent --model`` (real llama.cpp
on the tiny model, 4 slots each; see ``soak_cluster``), then for ``--duration`` seconds runs:

- ``--clients`` closed-loop chat clients, streaming and not (``soak_load.chat_client``), with a
  per-read client timeout of ``--hang-after`` seconds as the hang detector;
- every ``--chaos-every`` seconds, in turn: SIGKILL of one agent's llama.cpp (the agent restarts
  it), SIGKILL of one agent (the benchmark restarts it), or SIGSTOP of one llama.cpp for
  ``FREEZE_SECONDS`` (then SIGCONT): a frozen server, whose streams must end, not hang;
- every ``--storm-every`` seconds, a disconnect storm: ``--storm-size`` streams cancelled
  mid-answer;
- a slowloris of ``--slowloris`` connections trickling a request head on the proxy port;
- every 2 seconds, the balancer's RSS (``VmRSS`` of ``/proc/<pid>/status``) and CPU time.

Then the load stops and, for up to 30 s, it waits for the fleet to settle: the balancer's
``/api/v1/agents`` showing no request in flight and no slot processing, and every llama.cpp's
``/slots`` idle. What is still held then is reported as leaked.

RSS counts as bounded when the highest sample of the second half of the run is at most 10 %
(plus 5 MiB) above the highest of the first half. The report goes to ``docs/benchmarks.md``
between ``<!-- soak:begin -->`` and ``<!-- soak:end -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.cpu import process_seconds
from bench.environment import hardware
from bench.routing_report import write_section
from bench.runner import run, say
from bench.soak_cluster import AGENT_FLAGS, API_KEY, BALANCER_FLAGS, HOST, SLOTS, SoakCluster
from bench.soak_load import Tally, chat_client, disconnect_storm, slowloris

BEGIN = "<!-- soak:begin -->"
END = "<!-- soak:end -->"
ROOT = Path(__file__).resolve().parents[1]
FREEZE_SECONDS = 8.0
"""How long a frozen llama.cpp stays stopped: longer than the agent takes to call it unreachable."""
SAMPLE_EVERY = 2.0
SETTLE_TIMEOUT = 30.0


@dataclass
class Options:
    duration: float
    servers: int
    clients: int
    hang_after: float
    chaos_every: float
    storm_every: float
    storm_size: int
    slowloris: int


@dataclass
class Findings:
    tally: Tally = field(default_factory=Tally)
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the load started, balancer RSS in MiB)."""
    cpu_seconds: float = 0.0
    backend_kills: int = 0
    agent_kills: int = 0
    freezes: int = 0
    storms: int = 0
    slowloris_open_at_end: int = 0
    settled_after: float | None = None
    leaked_in_flight: int = 0
    leaked_processing: int = 0
    llamacpp_busy_slots: int = 0
    balancer_alive: bool = True


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample(pid: int, started: float, found: Findings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            found.rss_mib.append((time.monotonic() - started, rss_mib(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def chaos(
    cluster: SoakCluster, options: Options, found: Findings, stop: asyncio.Event
) -> None:
    turn = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), options.chaos_every)
        if stop.is_set():
            return
        names = sorted(cluster.agents)
        name = names[turn // 2 % len(names)]
        if turn % 3 == 0:
            if cluster.kill_llamacpp(name):
                found.backend_kills += 1
                say(f"soak: killed llama.cpp of {name}")
        elif turn % 3 == 1:
            await cluster.kill_agent(name)
            found.agent_kills += 1
            say(f"soak: killed and restarted agent {name}")
        elif await cluster.freeze_llamacpp(name, FREEZE_SECONDS):
            found.freezes += 1
            say(f"soak: froze llama.cpp of {name} for {FREEZE_SECONDS:g} s")
        turn += 1


async def storms(
    session: aiohttp.ClientSession,
    cluster: SoakCluster,
    options: Options,
    found: Findings,
    stop: asyncio.Event,
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), options.storm_every)
        if stop.is_set():
            return
        await disconnect_storm(session, cluster.proxy, found.tally, options.storm_size)
        found.storms += 1


async def settle(session: aiohttp.ClientSession, cluster: SoakCluster, found: Findings) -> None:
    """Wait for no reservation and no busy slot anywhere; record what is left after the wait."""
    started = time.monotonic()
    deadline = started + SETTLE_TIMEOUT
    while True:
        in_flight = processing = busy = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
            agents = (await cluster.agents_json(session))["agents"]
            in_flight = sum(agent["requests_in_flight"] for agent in agents)
            processing = sum(agent["slots_processing"] for agent in agents)
            for agent in agents:
                async with session.get(f"{agent['url']}/slots") as response:
                    slots = await response.json()
                busy += sum(1 for slot in slots if slot.get("is_processing"))
        found.leaked_in_flight, found.leaked_processing = in_flight, processing
        found.llamacpp_busy_slots = busy
        if in_flight == processing == busy == 0:
            found.settled_after = time.monotonic() - started
            return
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


async def benchmark(options: Options, output: Path | None, workdir: Path, stamp: str) -> int:
    load_before = os.getloadavg()[0]
    found = Findings()
    cluster = SoakCluster(workdir, options.servers)
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        try:
            await cluster.start(session)
            say(f"soak: cluster ready, load for {options.duration:g} s")
            pid = cluster.balancer_pid
            cpu_before = process_seconds(pid)
            stop = asyncio.Event()
            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                group.create_task(sample(pid, started, found, stop))
                group.create_task(chaos(cluster, options, found, stop))
                group.create_task(storms(session, cluster, options, found, stop))
                group.create_task(
                    slowloris(HOST, cluster.proxy_port, options.slowloris, found.tally, stop)
                )
                for _ in range(options.clients):
                    group.create_task(
                        chat_client(session, cluster.proxy, found.tally, options.hang_after, stop)
                    )
                await asyncio.sleep(options.duration)
                found.slowloris_open_at_end = found.tally.slowloris_opened - len(
                    found.tally.slowloris_closed
                )
                stop.set()
            found.cpu_seconds = process_seconds(pid) - cpu_before
            found.rss_mib.append((time.monotonic() - started, rss_mib(pid)))
            say("soak: load stopped; waiting for the fleet to settle")
            with contextlib.suppress(TimeoutError):
                await cluster.wait_ready(session, timeout=60)
            await settle(session, cluster, found)
            found.balancer_alive = (
                cluster.balancer is not None and cluster.balancer.returncode is None
            )
        finally:
            await cluster.stop()
    body = section(options, found, load_before, stamp, cluster.restarts)
    print(body, flush=True)
    if output is not None:
        write_section(output, body, BEGIN, END)
    leaked = found.leaked_in_flight or found.leaked_processing or found.llamacpp_busy_slots
    return 0 if found.balancer_alive and not leaked and found.tally.hung == 0 else 1


def bounded(samples: list[tuple[float, float]]) -> tuple[bool, float, float]:
    """Whether RSS stayed bounded (see the module docstring), and the two halves' maxima."""
    if len(samples) < 4:
        return True, 0.0, 0.0
    middle = samples[-1][0] / 2
    first = max(rss for at, rss in samples if at <= middle)
    second = max(rss for at, rss in samples if at > middle)
    return second <= first * 1.10 + 5, first, second


def section(
    options: Options, found: Findings, load_before: float, stamp: str, restarts: int
) -> str:
    machine = hardware(load_before)
    tally = found.tally
    served = sum(tally.served.values())
    errors = ", ".join(f"{kind}: {count}" for kind, count in tally.errors.most_common()) or "none"
    rss = [value for _, value in found.rss_mib]
    is_bounded, first_half, second_half = bounded(found.rss_mib)
    closed = tally.slowloris_closed
    closed_text = (
        f"{len(closed)} closed by the balancer (median after {statistics.median(closed):.0f} s)"
        if closed
        else "none closed by the balancer"
    )
    latency = (
        f"median {statistics.median(tally.latencies):.2f} s, "
        f"p99 {statistics.quantiles(tally.latencies, n=100)[98]:.2f} s"
        if len(tally.latencies) >= 2
        else "n/a"
    )
    settled = (
        f"settled {found.settled_after:.1f} s after the load stopped"
        if found.settled_after is not None
        else f"not settled after {SETTLE_TIMEOUT:g} s"
    )
    rss_over_time = " · ".join(
        f"{at:.0f} s: {value:.0f}"
        for at, value in found.rss_mib[:: max(1, len(found.rss_mib) // 12)]
    )
    command = (
        f"./scripts/bench soak --duration {options.duration:g} --servers {options.servers} "
        f"--clients {options.clients} --slowloris {options.slowloris}"
    )
    length = (
        f"{options.duration / 60:g} min" if options.duration >= 60 else f"{options.duration:g} s"
    )
    return f"""## Soak: mixed load, kill -9 and a slowloris, for {length}

`{command}`, run {stamp}, on {machine.cpus} CPUs ({machine.cpu_model}), {machine.memory_gib:.0f} GiB,
{machine.kernel}, load {machine.load_before:.2f} before the run. One `paddler balancer`
(`{" ".join(BALANCER_FLAGS)}`) and {options.servers} `paddler agent --model` with real llama.cpp on
the tiny model ({SLOTS} slots each; `{" ".join(AGENT_FLAGS)}`). For {options.duration:g} s:
{options.clients} closed-loop chat clients (60 % streaming, 8 to 64 tokens), a client-side read
timeout of {options.hang_after:g} s as the hang detector; every {options.chaos_every:g} s in turn
a SIGKILL of one llama.cpp (its agent restarts it), a SIGKILL of one agent (restarted by the
benchmark), or a SIGSTOP of one llama.cpp for {FREEZE_SECONDS:g} s;
every {options.storm_every:g} s a storm of {options.storm_size} streams cancelled mid-answer; and
{options.slowloris} connections trickling a request head on the proxy port, one byte every 3 s.

| measure | result |
|---|---|
| requests served | {served} ({tally.served["stream"]} streaming, {tally.served["plain"]} not); latency {latency} |
| errors, by what the client saw | {errors} |
| hung clients (no byte for {options.hang_after:g} s) | {tally.hung} |
| chaos | {found.backend_kills} llama.cpp killed, {found.agent_kills} agents killed ({restarts} restarted), {found.freezes} llama.cpp frozen for {FREEZE_SECONDS:g} s |
| disconnect storms | {found.storms} storms, {tally.cancelled} streams cancelled mid-answer |
| slowloris | {tally.slowloris_opened} opened ({tally.slowloris_refused} refused); {closed_text}; {found.slowloris_open_at_end} still open at the end |
| leaked reservations after the load | {found.leaked_in_flight} in flight, {found.leaked_processing} slots processing in `/api/v1/agents`, {found.llamacpp_busy_slots} busy in llama.cpp's `/slots`; {settled} |
| balancer RSS (MiB) | start {rss[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f}; max of the first half {first_half:.0f}, of the second {second_half:.0f}: {"bounded" if is_bounded else "still growing"} |
| balancer RSS over time (MiB) | {rss_over_time} |
| balancer CPU | {found.cpu_seconds:.0f} s over {options.duration:g} s ({found.cpu_seconds / options.duration * 100:.0f} % of one CPU); {found.cpu_seconds / max(1, served) * 1000:.1f} ms per request served |
| balancer alive at the end | {"yes" if found.balancer_alive else "no"} |

{findings(found, is_bounded)}
"""


def findings(found: Findings, is_bounded: bool) -> str:
    """What the run shows, in sentences, so that a rerun after a fix says what changed."""
    tally = found.tally
    lines = []
    if tally.slowloris_opened and found.slowloris_open_at_end == tally.slowloris_opened:
        lines.append(
            "every slowloris connection was still open when the load stopped: the proxy port "
            "has no timeout for reading a request head"
        )
    elif tally.slowloris_closed:
        lines.append("the balancer closed the slowloris connections")
    leaked = found.leaked_in_flight + found.leaked_processing + found.llamacpp_busy_slots
    lines.append("no reservation leaked" if not leaked else f"{leaked} reservation(s) leaked")
    lines.append("no client hung" if not tally.hung else f"{tally.hung} client(s) hung")
    lines.append("the balancer's RSS stayed bounded" if is_bounded else "RSS kept growing")
    return "Findings: " + "; ".join(lines) + "."


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (300)")
    parser.add_argument("--servers", type=int, default=3, help="agents with llama.cpp (3)")
    parser.add_argument("--clients", type=int, default=24, help="closed-loop chat clients (24)")
    parser.add_argument("--hang-after", type=float, default=30, help="client read timeout (30)")
    parser.add_argument("--chaos-every", type=float, default=20, help="seconds between kills (20)")
    parser.add_argument("--storm-every", type=float, default=15, help="seconds between storms (15)")
    parser.add_argument("--storm-size", type=int, default=40, help="streams per storm (40)")
    parser.add_argument("--slowloris", type=int, default=300, help="trickling connections (300)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-output", action="store_true", help="print the section only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    options = Options(
        duration=arguments.duration,
        servers=arguments.servers,
        clients=arguments.clients,
        hang_after=arguments.hang_after,
        chaos_every=arguments.chaos_every,
        storm_every=arguments.storm_every,
        storm_size=arguments.storm_size,
        slowloris=arguments.slowloris,
    )
    output = None if arguments.no_output else arguments.output
    run(
        lambda workdir, started_at, stamp: benchmark(options, output, workdir, started_at),
        name="soak",
        results_dir=ROOT / "bench" / "results",
        keep_logs=arguments.keep_logs,
    )


if __name__ == "__main__":
    main()
