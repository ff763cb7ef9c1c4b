"""The scale benchmark's outputs: raw JSON, and its section of docs/benchmarks.md.

One section per ``--label``, between ``<!-- scale-LABEL:begin -->`` and ``<!-- scale-LABEL:end
-->``, so that the baseline ("before") stays beside the run after a fix ("after"). The headline
table puts each figure next to what issue 10 measured and what it asks for; ratios against nginx
and against the 2-agent fleet come first, because the machine is shared and its absolute speed
drifts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from bench.environment import Hardware
from bench.held_requests import WINDOW
from bench.report import finite
from bench.scale_buffer import BufferResults
from bench.scale_config import ScaleConfig
from bench.scale_contestants import ContestantResults
from bench.scale_fleet import FleetResults
from bench.scale_tables import (
    buffer_table,
    chunk_table,
    fleet_table,
    helpers_table,
    memory_table,
    ms,
    ratio,
    small_table,
    stream_table,
    times,
)


@dataclass
class ScaleReport:
    config: ScaleConfig
    started_at: str
    duration_seconds: float
    hardware: Hardware
    versions: dict[str, str]
    contestants: ContestantResults
    fleets: FleetResults
    buffers: BufferResults


def markers(label: str) -> tuple[str, str]:
    return f"<!-- scale-{label}:begin -->", f"<!-- scale-{label}:end -->"


def _find(cells: list[Any], **fields: Any) -> Any:
    return next((c for c in cells if all(getattr(c, k) == v for k, v in fields.items())), None)


def headlines(report: ScaleReport) -> str:
    c, config = report.contestants, report.config
    rows = ["| measure | issue 10 measured | this run | target |", "|---|---|---|---|"]
    rounds = sorted({cell.round for cell in c.small if cell.kind == "load"})
    per_round = [
        (_find(c.small, contestant="paddler", kind="load", round=r),
         _find(c.small, contestant="nginx", kind="load", round=r))
        for r in rounds
    ]  # fmt: skip
    per_round = [(p, n) for p, n in per_round if p and n]
    if per_round:
        paddler_ms = [p.proxy_ms_per_request for p, _ in per_round]
        nginx_ms = [n.proxy_ms_per_request for _, n in per_round]
        ratios = [ratio(p, n) for p, n in zip(paddler_ms, nginx_ms, strict=True)]
        spread = (
            f" (rounds: {', '.join(f'{value:.3f}' for value in paddler_ms)})"
            if len(per_round) > 1
            else ""
        )
        rows.append(
            f"| CPU per small proxied request, Paddler / nginx"
            f"{', median of ' + str(len(per_round)) + ' rounds' if len(per_round) > 1 else ''} "
            f"| 0.45-0.56 / 0.023-0.047 ms "
            f"| {median(paddler_ms):.3f} / {median(nginx_ms):.3f} ms{spread} | ≤ 0.15 ms |"
        )
        rows.append(
            f"| ... as a ratio (median of the rounds' ratios) | 11-22x "
            f"| {times(median(ratios))} | - |"
        )
        hop_ms = [
            cell.proxy_ms_per_request
            for r in rounds
            if (cell := _find(c.small, contestant="python-hop", kind="load", round=r))
        ]
        if hop_ms:
            rows.append(
                f"| ... a bare Python hop's, the floor of a proxy in Python (no logic) | - "
                f"| {median(hop_ms):.3f} ms | - |"
            )
    latency = {
        name: _find(c.small, contestant=name, kind="latency")
        for name in ("direct", "nginx", "paddler")
    }
    if all(latency.values()):
        rows.append(
            f"| small request p50 / p99 at {config.latency_connections} connection: direct, "
            f"nginx, Paddler | - | "
            + ", ".join(f"{ms(cell.p50)} / {ms(cell.p99)}" for cell in latency.values())
            + " ms | - |"
        )
    for name, issue in (
        ("paddler", "+2, +10, +20 ms"),
        ("nginx", "+0.15, +0.45, +0.45 ms"),
        ("python-hop", "-"),
    ):
        added = []
        for streams in config.stream_counts:
            cell, base = (
                _find(c.streams, contestant=name, streams=streams),
                _find(c.streams, contestant="direct", streams=streams),
            )
            added.append(
                "-" if not cell or not base else f"{(cell.ttft_p50 - base.ttft_p50) * 1000:+.2f}"
            )
        target = "≤ 0.5 ms at 1; within 2 ms of nginx" if name == "paddler" else "-"
        counts = "/".join(str(n) for n in config.stream_counts)
        rows.append(
            f"| added TTFT p50 over direct at {counts} streams, {name} | {issue} | {', '.join(added)} ms | {target} |"
        )
    pc, nc = _find(c.chunks, contestant="paddler"), _find(c.chunks, contestant="nginx")
    if pc and nc:
        rows.append(
            f"| CPU per relayed SSE event, Paddler / nginx | 3.1-3.7x "
            f"| {pc.proxy_us_per_event:.1f} / {nc.proxy_us_per_event:.1f} µs = "
            f"{times(ratio(pc.proxy_us_per_event, nc.proxy_us_per_event))} | ≤ 2x |"
        )
        hc = _find(c.chunks, contestant="python-hop")
        if hc:
            rows.append(
                f"| ... a bare Python hop's | - | {hc.proxy_us_per_event:.1f} µs = "
                f"{times(ratio(hc.proxy_us_per_event, nc.proxy_us_per_event))} | - |"
            )
    pm, nm = _find(c.memory, contestant="paddler"), _find(c.memory, contestant="nginx")
    if pm and nm:
        rows.append(
            f"| memory per open stream, Paddler / nginx | 32 / 14 KiB "
            f"| {pm.bytes_per_stream / 1024:.1f} / {nm.bytes_per_stream / 1024:.1f} KiB | ≤ 20 KiB |"
        )
    fleets = report.fleets.cells
    if len(fleets) >= 2:
        small, large = fleets[0], fleets[-1]
        rows.append(
            f"| {large.agents} agents reporting, idle: balancer CPU | 12% of a core, ≈125 µs a frame "
            f"| {large.idle_core_share * 100:.1f}%, {large.idle_us_per_frame:.0f} µs a frame | ≤ 5% |"
        )
        rows.append(
            f"| CPU per request, {large.agents} agents / {small.agents} agents | 5.4-7.4x "
            f"| {times(ratio(large.load.proxy_ms_per_request, small.load.proxy_ms_per_request))} "
            f"| ≤ 1.3x |"
        )
        if small.nginx and large.nginx:
            rows.append(
                f"| ... nginx over {large.agents} / {small.agents} servers (random two "
                f"least_conn) | - | {times(ratio(large.nginx.proxy_ms_per_request, small.nginx.proxy_ms_per_request))} | - |"
            )
        rows.append(
            f"| p50 at {config.latency_connections} connection, {small.agents} → {large.agents} "
            f"agents | 0.6 → 3-4 ms | {ms(small.latency.p50)} → {ms(large.latency.p50)} ms | - |"
        )
    if report.buffers.cells:
        big = report.buffers.cells[-1]
        admitted = (
            f"all {big.waiting} in {big.fill_seconds:.1f} s"
            if big.filled
            else f"{big.admitted} of {big.waiting} in the {big.fill_seconds:.0f} s cap"
        )
        rows.append(
            f"| {big.waiting} waiting: admission | 4,460 of 10,000 in 75 s; 3,000 took 26 s "
            f"| {admitted} ({big.admission_rate:.0f}/s) | ≥ 2,000/s |"
        )
        rows.append(
            f"| {big.waiting} waiting: `/health` worst (p50) | over 10 s; 3.6 s "
            f"| {ms(big.health_worst, 0)} ({ms(big.health_p50, 1)}) ms | < 20 ms |"
        )
        rows.append(
            f"| {big.waiting} waiting: balancer RSS | - | {big.rss_full / 2**20:.0f} MiB | ≤ 150 MB |"
        )
        rows.append(
            f"| {big.waiting} waiting: departures out of FIFO order (beyond {big.order.window} "
            f"serving at once) | - | {big.order.displaced_beyond} of {big.order.count} | FIFO |"
        )
    return "\n".join(rows)


def section(report: ScaleReport) -> str:
    config, hardware, versions = report.config, report.hardware, report.versions
    c = report.contestants
    return f"""\
## Flat cost at fleet scale (issue 10): {config.label}

Written by `{config.command}` on {report.started_at} (UTC), in \
{report.duration_seconds / 60:.1f} minutes{" (--quick: short cells)" if config.quick else ""}. \
Generated: run the command again rather than editing this section (each `--label` writes its \
own). Raw results: `bench/results/scale-{config.label}-*.json` (not kept in git).

- Machine: {hardware.cpus} CPUs ({hardware.cpu_model}), {hardware.memory_gib:.1f} GiB, \
{hardware.kernel}; load average {hardware.load_before:.2f} when the run started. The CPUs are \
shared with other work: the "other CPUs" columns say how busy the rest of the machine was.
- {", ".join(f"{name} {version}" for name, version in versions.items())}.
- Paddler balancer flags beyond the defaults: \
{" ".join(f"`{flag}`" for flag in config.paddler_flags) or "none"} (plus the connection cap and, \
in the buffer sweep, the buffer's size and timeout).

### Headlines

{headlines(report)}

### Method

The upstream is `bench/fast_upstream.py`, a fake llama.cpp on `asyncio.Protocol` and uvloop \
that sends llama.cpp's bytes (its headers, keep-alive for 100 answers or 5 idle seconds, one \
HTTP chunk per SSE event, the final event with `timings`, a closed connection after every \
stream) on one port per simulated server, so that the balancer can reach each agent's address \
itself. Simulated agents (`bench/fake_agents.py`, one process) register and report over the \
agents' WebSocket as `paddler agent` does, once a second with 5 % jitter. Small requests are \
`POST /completion` with `n_predict` 1, not streamed, from `wrk` (one thread) with a Lua script; \
each wrk cell lasts {config.cell_seconds:g} s. CPU is read from `/proc` before and after each \
cell: the proxy's (nginx's master and worker; the balancer and its traits worker), the fast \
upstream's, the agents', wrk's, and the machine's. Contestants run at once and take turns, the \
order rotating from cell to cell. Direct goes to one of the {config.servers} simulated servers \
({config.slots} slots each); nginx (one worker, `least_conn`, upstream keep-alive, \
`proxy_buffering off`) and Paddler (`paddler balancer`, {config.servers} simulated agents) to \
both. The Python hop (`bench/proxy_floor/httptools_hop.py`, to the first server) is the floor of \
a proxy written in Python on this machine: the same HTTP layer as Paddler's (httptools on \
uvloop, a pooled upstream connection, the next one opened at a stream's head) and no logic at \
all (no routing, reservation, accounting, observers or log), so that Paddler's figure minus its \
figure is what Paddler's own logic costs.

### Small requests: direct, nginx, the Python hop, Paddler

{small_table(c.small)}

### Paced streams: time to first event

{config.stream_tokens} events, the first after {config.stream_first_ms} ms, then one every \
{config.stream_interval_ms} ms; closed-loop streams from `bench/paced_streams.py` (raw asyncio in \
the benchmark's process) for {config.stream_seconds:g} s after {config.stream_warmup:g} s of \
warm-up. Direct reconnects for every stream, as llama.cpp closes it; through a proxy the client \
keeps its connection. "resent": a kept connection that turned out closed before any byte of the \
answer (the upstream closes after each stream, a moment after its last chunk), so the request \
went again on a new one, timed from then. "errors": answers other than 200, not in the \
percentiles; nginx answers 502 now and then when the pooled connections it tried had just been \
closed by the upstream after a stream (llama.cpp does the same; the configuration is \
`bench/nginx.py`'s).

{stream_table(c.streams)}

### Relayed SSE events

{config.chunk_streams} wrk connections, each streaming {config.chunk_tokens} events every \
{config.chunk_interval_ms} ms (plus the final one); events counted by the fast upstream; about \
one request per {config.chunk_tokens + 1} events, so the per-request cost is a small share. \
wrk counts a read error each time the upstream closes a stream's connection, which only direct \
sees.

{chunk_table(c.chunks)}

### Memory per open stream

{config.memory_streams} slow streams (an event a second) held open by `bench/held_requests.py`; \
RSS of the proxy before they open and one second after all have their first event.

{memory_table(c.memory)}

### Fleet size

A fresh balancer for each size, with one simulated agent per port of one fast upstream. Idle: \
{config.idle_seconds:g} s of nothing but reports. Then wrk at {config.latency_connections} and \
{config.load_connections} connections, the latter {config.load_rounds} times (CPU per request: the \
median). Then nginx (`random two least_conn`: two servers drawn at random, the less busy taken) \
over the same servers, at {config.load_connections} connections, as many times.

{fleet_table(report.fleets.cells)}

### Buffer

A fresh balancer for each size, 2 simulated agents ({config.buffer_slots} slots each) that report \
no slot idle; `bench/held_requests.py` opens the connections, {WINDOW} at a time connecting, and \
sends one request on each. Admission: from just before the connections open to the first \
`/health` answer (proxy port, one probe every {config.probe_interval * 1000:.0f} ms throughout) \
that counts them all buffered, capped at {config.fill_cap:g} s. "SYNs dropped": connections the \
kernel refused at the balancer's full listen queue (its backlog follows \
`--max-client-connections`, within the kernel's `net.core.somaxconn`): each costs its client a 1 s \
retransmit. Then the agents report every slot idle and the fast upstream records \
the order requests reach it (capped at {config.drain_cap:g} s); inversions and displacements \
compare it with the order they were sent, {2 * config.buffer_slots} being served at once.

{buffer_table(report.buffers.cells)}

### The helpers are not the bottleneck

{helpers_table(c, report.fleets.cells, report.buffers.cells)}
"""


def write_json(report: ScaleReport, path: Path) -> None:
    document = {
        "started_at": report.started_at,
        "duration_seconds": report.duration_seconds,
        "config": asdict(report.config),
        "hardware": asdict(report.hardware),
        "versions": report.versions,
        "contestants": asdict(report.contestants),
        "fleets": asdict(report.fleets),
        "buffers": asdict(report.buffers),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(document), indent=1, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(f"not JSON: {type(value).__name__}")
