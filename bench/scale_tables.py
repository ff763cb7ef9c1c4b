"""The scale benchmark's detailed tables, one per kind of cell (Markdown)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from bench.scale_buffer import BufferCell
from bench.scale_contestants import ContestantResults, MemoryCell
from bench.scale_fleet import FleetCell
from bench.scale_measure import LoadCell, StreamCell


def ms(seconds: float, digits: int = 2) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def times(value: float) -> str:
    return "-" if math.isnan(value) or math.isinf(value) else f"{value:.2f}x"


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in errors.items()) or "0"


def small_table(cells: Iterable[LoadCell]) -> str:
    rows = [
        "| contestant | wrk connections | round | req/s | p50 (ms) | p99 (ms) | errors | proxy CPU "
        "per request (ms) | upstream CPU per request (ms) | proxy / upstream / wrk (CPUs) "
        "| other CPUs |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for cell in sorted(cells, key=lambda c: (c.connections, c.contestant, c.round)):
        usage = cell.usage
        proxy = f"{cell.proxy_ms_per_request:.3f}" if "proxy" in usage.cpu else "-"
        rows.append(
            f"| {cell.contestant} | {cell.connections} | {cell.round + 1} "
            f"| {cell.requests_per_second:.0f} "
            f"| {ms(cell.p50)} | {ms(cell.p99)} | {_errors(cell.errors)} | {proxy} "
            f"| {cell.ms_per('upstream', cell.requests):.3f} "
            f"| {usage.cores('proxy'):.2f} / {usage.cores('upstream'):.2f} / {usage.cores('wrk'):.2f} "
            f"| {usage.other / usage.wall:.2f} |"
        )
    return "\n".join(rows)


def stream_table(cells: list[StreamCell]) -> str:
    direct = {cell.streams: cell for cell in cells if cell.contestant == "direct"}
    rows = [
        "| streams | contestant | requests | TTFT p50 (ms) | TTFT p99 (ms) | added p50 over direct "
        "(ms) | added p99 (ms) | errors | resent | proxy CPUs | client CPUs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in sorted(cells, key=lambda c: (c.streams, c.contestant)):
        base = direct.get(cell.streams)
        added = (
            "-"
            if base is None or cell is base
            else f"{(cell.ttft_p50 - base.ttft_p50) * 1000:+.2f}"
        )
        added99 = (
            "-"
            if base is None or cell is base
            else f"{(cell.ttft_p99 - base.ttft_p99) * 1000:+.2f}"
        )
        rows.append(
            f"| {cell.streams} | {cell.contestant} | {cell.requests} | {ms(cell.ttft_p50)} "
            f"| {ms(cell.ttft_p99)} | {added} | {added99} | {cell.errors} | {cell.resent} "
            f"| {cell.usage.cores('proxy'):.2f} | {cell.usage.cores('client'):.2f} |"
        )
    return "\n".join(rows)


def chunk_table(cells: list[LoadCell]) -> str:
    nginx = next((cell for cell in cells if cell.contestant == "nginx"), None)
    rows = [
        "| contestant | streams | events relayed | events/s | proxy CPU per event (µs) | "
        "ratio to nginx | proxy / upstream / wrk (CPUs) | wrk read errors |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for cell in cells:
        usage = cell.usage
        per = cell.proxy_us_per_event if "proxy" in usage.cpu else float("nan")
        base = nginx.proxy_us_per_event if nginx is not None else float("nan")
        rows.append(
            f"| {cell.contestant} | {cell.connections} | {cell.events} "
            f"| {cell.events / usage.wall:.0f} | {'-' if math.isnan(per) else f'{per:.1f}'} "
            f"| {times(ratio(per, base)) if cell.contestant != 'nginx' else '1x'} "
            f"| {usage.cores('proxy'):.2f} / {usage.cores('upstream'):.2f} / {usage.cores('wrk'):.2f} "
            f"| {cell.errors.get('read', 0)} |"
        )
    return "\n".join(rows)


def memory_table(cells: list[MemoryCell]) -> str:
    rows = [
        "| contestant | streams open / asked | failed | RSS before (MiB) | RSS with them open "
        "(MiB) | per stream (KiB) | seconds to open |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        rows.append(
            f"| {cell.contestant} | {cell.opened} / {cell.streams} | {cell.failed} "
            f"| {cell.rss_before / 2**20:.1f} | {cell.rss_open / 2**20:.1f} "
            f"| {cell.bytes_per_stream / 1024:.1f} | {cell.seconds_to_open:.1f} |"
        )
    return "\n".join(rows)


def fleet_table(cells: list[FleetCell]) -> str:
    base = cells[0] if cells else None
    rows = [
        "| agents | ready after (s) | idle: balancer CPU (% of a core) | µs per status frame "
        f"| µs per frame beyond the {base.agents if base else '-'}-agent idle "
        "| frames/s | p50 at 1 conn (ms) | p99 (ms) | req/s at 32 conns | CPU per request (ms) "
        f"| x {base.agents if base else '-'} agents | rounds (ms) | nginx over as many servers: CPU per "
        f"request (ms) | nginx x {base.agents if base else '-'} servers "
        "| RSS (MiB) | agents process (CPUs) | other CPUs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        marginal = "-"
        if base is not None and cell is not base:
            frames = cell.frames / cell.idle.wall - base.frames / base.idle.wall
            cpu = cell.idle_core_share - base.idle_core_share
            marginal = f"{cpu / frames * 1e6:.0f}" if frames > 0 else "-"
        per = cell.load.proxy_ms_per_request
        against = ratio(per, base.load.proxy_ms_per_request) if base else float("nan")
        nginx = cell.nginx.proxy_ms_per_request if cell.nginx else float("nan")
        nginx_base = base.nginx.proxy_ms_per_request if base and base.nginx else float("nan")
        rows.append(
            f"| {cell.agents} | {cell.setup_seconds:.1f} | {cell.idle_core_share * 100:.1f} "
            f"| {cell.idle_us_per_frame:.0f} | {marginal} | {cell.frames / cell.idle.wall:.0f} "
            f"| {ms(cell.latency.p50)} | {ms(cell.latency.p99)} "
            f"| {cell.load.requests_per_second:.0f} | {per:.3f} | {times(against)} "
            f"| {', '.join(f'{value:.3f}' for value in cell.load_rounds) or '-'} "
            f"| {nginx:.3f} | {times(ratio(nginx, nginx_base))} "
            f"| {cell.rss / 2**20:.0f} | {cell.idle.cores('agents'):.2f} "
            f"| {cell.load.usage.other / cell.load.usage.wall:.2f} |"
        )
    return "\n".join(rows)


def buffer_table(cells: list[BufferCell]) -> str:
    rows = [
        "| waiting | admitted | in (s) | admitted/s | SYNs dropped | /health p50 (ms) | /health "
        "worst (ms) | RSS empty → full (MiB) | balancer CPUs | answered after release | in (s) "
        "| inversions | max displacement | beyond the window | statuses | other CPUs |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for cell in cells:
        capped = "" if cell.filled else " (cap)"
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(cell.statuses.items()))
        rows.append(
            f"| {cell.waiting} | {cell.admitted} | {cell.fill_seconds:.1f}{capped} "
            f"| {cell.admission_rate:.0f} | {cell.listen_overflows} | {ms(cell.health_p50, 1)} "
            f"| {ms(cell.health_worst, 0)} | {cell.rss_before / 2**20:.0f} → "
            f"{cell.rss_full / 2**20:.0f} | {cell.fill_usage.cores('proxy'):.2f} "
            f"| {cell.drained} | {cell.drain_seconds:.1f} | {cell.order.inversions} "
            f"| {cell.order.max_displacement} | {cell.order.displaced_beyond} | {statuses} "
            f"| {cell.fill_usage.other / cell.fill_usage.wall:.2f} |"
        )
    return "\n".join(rows)


def helpers_table(
    results: ContestantResults, fleets: list[FleetCell], buffers: list[BufferCell]
) -> str:
    """The most CPU each load generator or fake took in any cell: none may be the bottleneck."""
    peaks: dict[str, tuple[float, str]] = {}

    def see(party: str, cores: float, where: str) -> None:
        if cores > peaks.get(party, (-1.0, ""))[0]:
            peaks[party] = (cores, where)

    for cell in [*results.small, *results.chunks]:
        for party in ("upstream", "wrk", "agents"):
            see(party, cell.usage.cores(party), f"{cell.kind} {cell.contestant}")
    for stream in results.streams:
        see(
            "upstream",
            stream.usage.cores("upstream"),
            f"{stream.streams} streams {stream.contestant}",
        )
        see(
            "client (paced streams)",
            stream.usage.cores("client"),
            f"{stream.streams} streams {stream.contestant}",
        )
    for fleet in fleets:
        see("agents", fleet.idle.cores("agents"), f"{fleet.agents} agents idle")
        for cell in (fleet.latency, fleet.load):
            for party in ("upstream", "wrk", "agents"):
                see(party, cell.usage.cores(party), f"{fleet.agents} agents, {cell.kind}")
    for buffer in buffers:
        see("held requests", buffer.fill_usage.cores("held"), f"buffer {buffer.waiting}")
    rows = ["| helper | most CPUs in a cell | in |", "|---|---:|---|"]
    rows += [f"| {party} | {cores:.2f} | {where} |" for party, (cores, where) in peaks.items()]
    return "\n".join(rows)
