"""The benchmark's outputs: Markdown tables, the raw JSON, and docs/benchmarks.md."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.contestants import BASELINE
from bench.environment import Hardware, Versions
from bench.stats import Cell, CellStats, Ratios, ratios


@dataclass(frozen=True)
class Report:
    config: BenchConfig
    started_at: str
    """UTC, ISO 8601."""
    duration_seconds: float
    hardware: Hardware
    versions: Versions
    cells: list[CellStats]

    def ratios(self) -> list[Ratios]:
        baselines = {cell.concurrency: cell for cell in self.cells if cell.contestant == BASELINE}
        return [
            ratios(cell, baselines[cell.concurrency])
            for cell in self.cells
            if cell.contestant != BASELINE and cell.concurrency in baselines
        ]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def _times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _added(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:+.2f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _buffered(cell: CellStats) -> str:
    if cell.queues.max_buffered is None or cell.queues.mean_buffered is None:
        return "-"
    return f"{cell.queues.max_buffered:g} / {cell.queues.mean_buffered:.1f}"


def results_table(cells: list[CellStats]) -> str:
    rows = [
        "| streams | contestant | requests | errors | TTFT p50 | TTFT p90 | TTFT p99 "
        "| total p50 | total p90 | total p99 | req/s | tokens/s | max deferred | buffered max / mean |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        rows.append(
            f"| {cell.concurrency} | {cell.contestant} | {cell.requests} | {cell.errors} "
            f"| {_ms(cell.ttft.p50)} | {_ms(cell.ttft.p90)} | {_ms(cell.ttft.p99)} "
            f"| {_ms(cell.total.p50)} | {_ms(cell.total.p90)} | {_ms(cell.total.p99)} "
            f"| {cell.requests_per_second:.1f} | {cell.tokens_per_second:.0f} "
            f"| {_count(cell.queues.max_deferred)} | {_buffered(cell)} |"
        )
    return "\n".join(rows)


def ratio_table(report_ratios: list[Ratios]) -> str:
    rows = [
        "| streams | ratio | TTFT p50 | TTFT p90 | total p50 | total p90 "
        "| TTFT p50 added (ms) | total p50 added (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio in report_ratios:
        rows.append(
            f"| {ratio.concurrency} | {ratio.contestant} / {BASELINE} "
            f"| {_times(ratio.ttft_p50)} | {_times(ratio.ttft_p90)} "
            f"| {_times(ratio.total_p50)} | {_times(ratio.total_p90)} "
            f"| {_added(ratio.ttft_p50_added)} | {_added(ratio.total_p50_added)} |"
        )
    return "\n".join(rows)


def _spread(seconds: list[float]) -> str:
    values = [value * 1000 for value in seconds if not math.isnan(value)]
    return f"{min(values):.1f} to {max(values):.1f}" if values else "-"


def cpu_table(cells: list[CellStats]) -> str:
    rows = [
        "| streams | contestant | client CPU | proxy CPU | llama.cpp CPU | stolen CPUs "
        "| TTFT p50 of single rounds (ms) | total p50 of single rounds (ms) |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for cell in cells:
        cpu = cell.cpu_ms_per_request
        proxy = f"{cpu.get('proxy', 0.0):.2f}" if cell.contestant != BASELINE else "-"
        rows.append(
            f"| {cell.concurrency} | {cell.contestant} | {cpu.get('client', 0.0):.2f} "
            f"| {proxy} | {cpu.get('llamacpp', 0.0):.2f} | {cell.stolen_cores_mean:.2f} "
            f"| {_spread(cell.ttft_p50_by_round)} | {_spread(cell.total_p50_by_round)} |"
        )
    return "\n".join(rows)


def tables(report: Report) -> str:
    return (
        "Latencies in milliseconds.\n\n"
        f"{results_table(report.cells)}\n\n"
        "Each proxy against direct at the same number of streams:\n\n"
        f"{ratio_table(report.ratios())}\n\n"
        "CPU milliseconds per request (warm-up and cool-down requests included), CPUs' worth of "
        "time stolen by the hypervisor (mean over the runs), and how far apart the rounds "
        "were:\n\n"
        f"{cpu_table(report.cells)}\n"
    )


def method(config: BenchConfig) -> str:
    servers = "One llama.cpp server" if config.servers == 1 else f"{config.servers} servers"
    threads = "1 CPU thread" if config.threads == 1 else f"{config.threads} CPU threads"
    rounds = "1 round" if config.rounds == 1 else f"{config.rounds} rounds"
    return f"""\
- **Backend.** {servers} (llama.cpp's own HTTP server through xllamacpp, {threads}, \
{config.slots} slots of {config.context_size // config.slots} tokens each) on the \
tiny random-weight llama model that Paddler generates (`TinyModelShape()`: 64-dim, 2 layers), so \
that generation is fast and what a proxy adds is visible. There are as many slots as the most \
streams, so that no request has to wait for a slot: the "max deferred" and "buffered" columns \
show whether any did anyway, in llama.cpp or in Paddler.
- **Contestants**, all started once and kept running for the whole run, against the same \
server(s): `direct` (the client talks to llama.cpp), `nginx` (a plain reverse proxy, one worker, \
`proxy_buffering off`, HTTP/1.1 with upstream keep-alive) and `paddler` (`paddler balancer` plus \
one `paddler agent` per server, monitoring every 100 ms). llama.cpp closes the connection after \
every streamed answer, and a client that reuses it races that close and sometimes loses its next \
request; so `direct` opens a new connection for every request (`Connection: close`), which costs \
the Python client about a millisecond of CPU. Through a proxy the client keeps its connection, \
and the proxy opens the new one to llama.cpp (nginx and Paddler both resend a request on a new \
connection when a pooled one turns out closed).
- **Load.** One Python process with one aiohttp `ClientSession` runs closed-loop streams: each \
stream sends a request, reads its event stream to the end, then sends the next. Each request is a \
streaming `POST /completion` with a prompt of its own (all of the same length, about 60 tokens), \
`n_predict` {config.n_predict}, `ignore_eos`, and `cache_prompt` left at its default.
- **Rounds.** For each number of streams, {rounds}; in each round every contestant \
in turn (the order rotates from round to round) gets one closed-loop run: unmeasured warm-up \
requests (twice the number of streams, at least 8), its share of the {config.requests} measured \
requests per cell, then as many unmeasured requests as there are streams, so that every measured \
request runs under the full, steady load. The first request of each stream asks for fewer tokens \
(stream *k* of *n* for about *k/n* of them): streams that start together and ask for equal \
lengths would otherwise stay in lockstep, decoded in the same batches, and every request would \
arrive in a burst of all the streams at once.
- **Measures.** TTFT runs from just before the request is sent to the first SSE event carrying a \
token (llama.cpp holds back a token that ends inside a UTF-8 sequence, so with the tiny model's \
byte tokens that is sometimes the second token, alike for every contestant); total latency to the \
end of the response body. Throughput is successful measured requests \
(and their generated tokens) divided by the time from the first measured request's start to the \
first cool-down request's start, summed over the rounds. Ratios divide a proxy's percentile by \
direct's at the same number of streams.
- **Queues.** During every measured run each server's `/metrics` is polled every \
{config.poll_interval * 1000:.0f} ms: "max deferred" is the highest `llamacpp:requests_deferred` \
seen while measured requests ran (llama.cpp's own wait queue; 0 means nothing queued there). For \
Paddler, "buffered" is the highest and the mean `requests_buffered` its management API showed \
(requests Paddler held back because it counted no free slot); by Little's law, mean buffered \
divided by req/s is the mean time a request waited in Paddler's buffer.
- **CPU.** The client's, the proxy's (nginx's master and worker; Paddler's balancer, not its \
agent, which polls at the same pace whatever the traffic) and llama.cpp's CPU time are read from \
`/proc` before and after each run and divided by the requests sent. The machine's busy time \
minus the benchmark's own tells whether anything else ran meanwhile: a run during which other \
processes took more than {config.disturbance_limit:g} CPUs on average is measured again (at most \
{config.disturbed_retries} times). Steal time (the hypervisor running other virtual machines on \
these CPUs) cannot be waited out; it is reported, and the rotating rounds spread it over the \
contestants.
- **Caveat.** Everything shares this machine's CPUs: the client, the proxy and llama.cpp compete \
for them, so a proxy that burns CPU also slows the server beside it. That is part of what is \
measured here, as it would be on a host that runs both. Once llama.cpp and the client keep the \
CPUs busy (16 streams and more here), differences of the size of the round-to-round spread are \
noise."""


def markdown_document(report: Report) -> str:
    hardware, versions = report.hardware, report.versions
    return f"""\
# Benchmarks

## What Paddler adds over talking to llama.cpp directly

Written by `{report.config.command}` on {report.started_at} (UTC), in \
{report.duration_seconds:.0f} s. This file is generated: run the command again rather than \
editing it. Raw results go to `bench/results/` (not kept in git).

### Machine

- CPUs (`nproc`): {hardware.cpus}, {hardware.cpu_model}
- Memory: {hardware.memory_gib:.1f} GiB
- Kernel: {hardware.kernel}
- Load average (1 min) when the run started: {hardware.load_before:.2f}

### Versions

- llama.cpp: build `{versions.llamacpp_build}` (`build_info` from `/props`), through xllamacpp \
{versions.xllamacpp}
- nginx: {versions.nginx}
- Paddler {versions.paddler}; aiohttp {versions.aiohttp}; Python {versions.python}

### Method

{method(report.config)}

### Results

{tables(report)}
### Checks

{checks(report)}
"""


def checks(report: Report) -> str:
    errors = sum(cell.errors for cell in report.cells)
    requests = sum(cell.requests for cell in report.cells)
    deferred = max((cell.queues.max_deferred for cell in report.cells), default=0.0)
    deferred_whole = max((cell.max_deferred_whole_run for cell in report.cells), default=0.0)
    buffered = max((cell.queues.max_buffered or 0.0 for cell in report.cells), default=0.0)
    polls = sum(cell.queues.polls for cell in report.cells)
    unmeasured = sum(cell.unmeasured_errors for cell in report.cells)
    lines = [
        f"- Errors: {errors} of {requests} measured requests; {unmeasured} among the "
        "warm-up and cool-down requests.",
        f"- Highest `requests_deferred` in llama.cpp over {polls} polls during measured "
        f"requests: {deferred:g} (over whole runs, warm-up and cool-down included: "
        f"{deferred_whole:g}).",
        f"- Highest `requests_buffered` in Paddler during measured requests: {buffered:g}.",
    ]
    examples = {
        error: count for cell in report.cells for error, count in cell.error_examples.items()
    }
    lines += [f"  - `{error}` ({count} times)" for error, count in list(examples.items())[:5]]
    repeated = sum(cell.repeated_runs for cell in report.cells)
    other = max((cell.other_cores_max for cell in report.cells), default=0.0)
    stolen = max((cell.stolen_cores_max for cell in report.cells), default=0.0)
    lines.append(
        f"- During a counted run, other processes on the machine took at most {other:.2f} CPUs; "
        f"{repeated} run(s) were measured again because they took more than "
        f"{report.config.disturbance_limit:g}."
    )
    lines.append(
        f"- The hypervisor gave up to {stolen:.2f} CPUs' worth of time to other virtual "
        "machines during a run (steal time; per cell in the last table)."
    )
    return "\n".join(lines)


def write_json(report: Report, cells: list[Cell], path: Path) -> None:
    """Everything: settings, machine, versions, cell statistics and every single request."""
    document: dict[str, Any] = {
        "started_at": report.started_at,
        "duration_seconds": report.duration_seconds,
        "config": asdict(report.config),
        "hardware": asdict(report.hardware),
        "versions": asdict(report.versions),
        "cells": [asdict(cell) for cell in report.cells],
        "ratios": [asdict(ratio) for ratio in report.ratios()],
        "samples": [
            {
                "contestant": cell.contestant,
                "concurrency": cell.concurrency,
                "runs": [
                    {
                        "wall": run.wall,
                        # [ttft seconds, total seconds, tokens, error]
                        "requests": [
                            [sample.ttft, sample.total, sample.tokens, sample.error]
                            for sample in run.samples
                        ],
                    }
                    for run in cell.runs
                ],
            }
            for cell in cells
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(document), indent=1) + "\n")


def finite(value: Any) -> Any:
    """NaN is not JSON: it becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
