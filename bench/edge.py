"""Can a client, a backend or an agent still hang, stall or flood the balancer? Issue 9's "Why"
measurements, on the fixed code.

Usage: ``./scripts/bench edge [--output docs/benchmarks.md] [--no-output] [--keep-logs]`` (or
``python -m bench.edge`` inside the venv). It starts a real cluster: a ``paddler balancer``
process on its default flags and two ``paddler agent --model`` with real llama.cpp on a slow
tiny model (2 slots each), and measures, in order:

1. a frozen backend: two streams on one server, SIGSTOP of its llama.cpp (SIGCONT always
   follows): seconds until both clients got the SSE error event, who serves a new request
   meanwhile, and whether the server serves again after SIGCONT; then the same with its agent
   frozen too (a paused host, which no report will call unreachable);
2. a rogue registration (``127.0.0.1:1``, 60,000 idle slots): ``/health``, the autoscaling
   advice and the Prometheus capacity; and whether hosts with ``:`` or NUL and a name with a
   newline and ESC are refused;
3. a status flood (50,000 frames from one socket, ``--rounds`` times): ``/health`` latency
   while it lasts, and the balancer's CPU from ``/proc``;
4. a slowloris (800 connections trickling a header byte every 3 s) for 60 s, a silent
   connection, and two chat clients meanwhile;
5. the connection cap: 300 connections to another balancer with
   ``--max-client-connections=200``: how many got 503, and its RSS;
6. client keys: a third balancer with ``--api-key``, in front of one of the cluster's llama.cpp:
   what a missing or wrong key gets, whether a key reaches the log, ``/health`` without one.

It writes its section of ``docs/benchmarks.md`` between ``<!-- edge:begin -->`` and
``<!-- edge:end -->``; the "issue" column quotes what issue 9 measured before the fix.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench import edge_checks
from bench.edge_checks import Cap, FloodRound, Frozen, Keys, Rogue, Slowloris
from bench.environment import hardware
from bench.large_bodies import serving, stream_or_answer
from bench.routing_report import write_section
from bench.runner import run, say
from bench.soak_cluster import SoakCluster
from paddler.tiny_model import TinyModelShape

BEGIN = "<!-- edge:begin -->"
END = "<!-- edge:end -->"
ROOT = Path(__file__).resolve().parents[1]
SLOW_SHAPE = TinyModelShape(embedding_length=256, block_count=4, feed_forward_length=768)
"""The end-to-end tests' slow model: a long stream is still running when it is frozen."""
AGENT_FLAGS = ("--slots=2", "--threads=1", "--context-size=8192", "--monitoring-interval=0.5")
FRAMES = 50_000
SLOWLORIS = 800
SLOWLORIS_AFTER = 60.0
SILENT_MAX = 100.0
CAP, OVER_CAP = 200, 300


async def benchmark(output: Path | None, workdir: Path, rounds: int) -> int:
    load_before = os.getloadavg()[0]
    # 800 trickling connections and 300 more: the client needs the descriptors too.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    cluster = SoakCluster(
        workdir, servers=2, balancer_flags=(), agent_flags=AGENT_FLAGS, model_shape=SLOW_SHAPE
    )
    async with aiohttp.ClientSession() as session:
        try:
            await cluster.start(session)
            say("cluster ready; freezing a llama.cpp")
            frozen = await edge_checks.frozen_backend(session, cluster)
            say(f"frozen: {frozen}")
            await edge_checks.settled(session, cluster, idle=4)
            host = await edge_checks.frozen_backend(session, cluster, with_agent=True)
            say(f"frozen host: {host}")
            # The cancelled streams end in llama.cpp a moment later.
            await edge_checks.settled(session, cluster, idle=4)
            rogue = await edge_checks.rogue_registration(session, cluster)
            say(f"rogue: {rogue}")
            agents = (await cluster.agents_json(session))["agents"]
            llamacpp_port = edge_checks.host_port(agents[0]["url"])[1]
            flood = []
            # The flooder claims a server of its own: at a real agent's address it would take
            # that agent's place, and the real agent's reconnection would end the flood at once.
            async with serving(stream_or_answer) as flooded_port:
                for _ in range(rounds):
                    flood.append(await edge_checks.status_flood(cluster, flooded_port, FRAMES))
                    say(f"flood: {flood[-1]}")
            say(f"slowloris for {SLOWLORIS_AFTER:g} s")
            loris = await edge_checks.slowloris_under_load(
                session, cluster.proxy, SLOWLORIS, SLOWLORIS_AFTER, SILENT_MAX
            )
            say(f"slowloris: {loris}")
            cap = await edge_checks.connection_cap(workdir / "cap", CAP, OVER_CAP)
            say(f"cap: {cap}")
            keys = await edge_checks.client_keys(session, workdir / "keys", llamacpp_port)
            say(f"keys: {keys}")
        finally:
            await cluster.stop()
    text = section(
        frozen, host, rogue, flood, loris, cap, keys, load_before, time.monotonic() - started
    )
    print(text, flush=True)
    if output is not None:
        write_section(output, text, BEGIN, END)
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _number(value: float | None) -> str:
    return "absent" if value is None else f"{value:g}"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _flood_cell(rounds: list[FloodRound], measure: str) -> str:
    values = [getattr(one, measure) for one in rounds]
    return f"{_ms(statistics.median(values))} (worst {_ms(max(values))})"


def section(
    frozen: Frozen,
    host: Frozen,
    rogue: Rogue,
    flood: list[FloodRound],
    loris: Slowloris,
    cap: Cap,
    keys: Keys,
    load_before: float,
    duration: float,
) -> str:
    machine = hardware(load_before)
    errors = ", ".join(f"{seconds:.1f} s" for seconds in frozen.error_seconds) or "none"
    host_errors = ", ".join(f"{seconds:.1f} s" for seconds in host.error_seconds) or "none"
    before, after = rogue.before, rogue.after
    silent = (
        f"closed after {loris.silent_lifetime:.1f} s"
        if loris.silent_lifetime is not None
        else f"still open after {SILENT_MAX:g} s"
    )
    endings = [one.ending.split() for one in flood]  # "closed <code> <frames sent>"
    codes = ", ".join(sorted({ending[1] for ending in endings}))
    sent = ", ".join(f"{int(ending[2]):,}" for ending in endings)
    cpu = statistics.median(one.balancer_cpu / one.seconds for one in flood)
    refused = "; ".join(f"{label}: {_yes(value)}" for label, value in rogue.refused.items())
    rows = [
        (
            "frozen backend: SIGSTOP with 2 streams on it, each client's SSE error event after",
            "no byte and no error for 75 s",
            f"{errors} ({len(frozen.error_seconds)} of {frozen.clients} clients)",
        ),
        (
            "a new request meanwhile",
            "",
            f"{frozen.meanwhile}: served by the other server: {_yes(frozen.served_elsewhere)}",
        ),
        (
            "after SIGCONT",
            "",
            f"usable again after {frozen.usable_again_seconds or 0:.1f} s; took "
            f"{frozen.thawed_served} of 4 concurrent streams",
        ),
        (
            "frozen host: the same with its agent SIGSTOPped too, each client's error event after",
            "not measured (the read timeout: 10 min)",
            f"{host_errors} ({len(host.error_seconds)} of {host.clients} clients); a new request "
            f"meanwhile: {host.meanwhile}; usable again {host.usable_again_seconds or 0:.1f} s "
            "after SIGCONT",
        ),
        (
            f"slowloris: of {loris.connections} connections trickling a byte every 3 s, "
            f"still open after {SLOWLORIS_AFTER:g} s",
            "800 of 800",
            f"{loris.still_open} of {loris.opened} (the last closed {loris.closed_within:.1f} s "
            "after it opened)",
        ),
        ("a silent connection", "still open after 100 s", silent),
        (
            "2 chat clients during the slowloris",
            "",
            f"{loris.served} served, {loris.errors} errors; p99 {loris.p99:.2f} s",
        ),
        (
            f"{cap.connections} connections, `--max-client-connections={cap.cap}`",
            "no cap",
            f"{cap.got_503} got 503; balancer RSS {cap.rss_before:.0f} MiB before, "
            f"{cap.rss_after:.0f} MiB with them open",
        ),
        (
            "rogue registration, 127.0.0.1:1 with 60,000 idle slots: `/health` slots_idle",
            "65,538",
            f"{after.health_idle} ({before.health_idle} before it registered)",
        ),
        (
            "its autoscaling advice",
            '"remove 2 servers"',
            f"{after.advice_servers} servers, {after.advice_slots} slots, suggested change "
            f"{after.suggested_change} (before: {before.advice_servers}, {before.advice_slots}, "
            f"{before.suggested_change}; an idle fleet is advised 0 servers)",
        ),
        (
            "its Prometheus capacity (`paddler_slots`)",
            "",
            f"{_number(after.metrics_slots)} ({_number(before.metrics_slots)} before)",
        ),
        ("refused registrations", "all accepted", refused),
        (
            f"status flood, {FRAMES:,} frames from one socket: `/health` longest",
            "0.52 s",
            _flood_cell(flood, "longest"),
        ),
        ("`/health` p99 during the flood", "", _flood_cell(flood, "p99")),
        ("`/health` median during the flood", "", _flood_cell(flood, "median")),
        (
            "the flooding socket",
            "",
            f"the balancer closed it (code {codes}) after {sent} frames; balancer CPU "
            f"{cpu * 100:.0f} % of one CPU",
        ),
        (
            "`--api-key`: no key / wrong Bearer / wrong X-Api-Key / right key",
            "no client authentication",
            f"{keys.no_key} / {keys.wrong_bearer} / {keys.wrong_x_api_key} / {keys.right_key}; "
            f"OpenAI error shape: {_yes(keys.openai_shape)}",
        ),
        (
            "keys in the balancer's log / `/health` without a key",
            "",
            f"{keys.key_in_log} occurrences / {keys.health}",
        ),
    ]
    table = "\n".join(f"| {measure} | {issue} | {now} |" for measure, issue, now in rows)
    worst = max(one.longest for one in flood)
    findings = (
        f"Findings: the frozen server's streams ended with the error event in "
        f"{max(frozen.error_seconds, default=float('nan')):.1f} s; the slowloris held "
        f"{loris.still_open} connections after {SLOWLORIS_AFTER:g} s; the rogue changed "
        f"the capacity: {_yes(before != after)}; under the flood `/health` took at most {_ms(worst)} "
        f"(target: 20 ms); no key reached the log."
    )
    return f"""## Trust at the edge: issue 9's reproductions, on the fixed code

`./scripts/bench edge --rounds {len(flood)}`, on {machine.cpus} CPUs ({machine.cpu_model}),
{machine.memory_gib:.0f} GiB, {machine.kernel}, load {load_before:.2f} before the run; it took
{duration:.0f} s. A `paddler balancer` process on its default flags and two `paddler agent
--model` with real llama.cpp (a slow tiny model, `{" ".join(AGENT_FLAGS)}`); the connection cap
and the client keys each on a balancer of their own. The status flood ran {len(flood)} rounds:
the median round, and the worst. The "issue" column quotes what issue 9 measured before the fix.
Large bodies have their own benchmark: [the section below](#does-a-large-json-body-stall-other-requests-issue-9).

| measure | issue | now |
|---|---|---|
{table}

{findings}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench edge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-output", action="store_true", help="print the section only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--rounds", type=int, default=3, help="status flood rounds (3)")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    output = None if arguments.no_output else arguments.output
    run(
        lambda workdir, started_at, stamp: benchmark(output, workdir, arguments.rounds),
        name="edge",
        results_dir=ROOT / "bench" / "results",
        keep_logs=arguments.keep_logs,
    )


if __name__ == "__main__":
    main()
