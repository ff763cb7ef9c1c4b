"""The routing benchmark's outputs: raw JSON, the plot, and its own section of docs/benchmarks.md.

docs/benchmarks.md belongs to the overhead benchmark too, so this one writes only between
``<!-- routing:begin -->`` and ``<!-- routing:end -->`` (appended at the end of the file if they
are missing) and leaves every other byte alone.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.environment import Hardware, Versions
from bench.report import finite
from bench.routing_config import RoutingConfig
from bench.routing_contestants import REFERENCE
from bench.routing_plot import plot_ttft
from bench.routing_stats import RunStats
from bench.runner import say
from bench.workloads import describe

BEGIN = "<!-- routing:begin -->"
END = "<!-- routing:end -->"
_LETTER = {"chat": "(a)", "independent": "(b)", "mixed": "(c)"}


@dataclass(frozen=True)
class RoutingReport:
    config: RoutingConfig
    started_at: str
    duration_seconds: float
    hardware: Hardware
    versions: Versions
    runs: list[RunStats]

    def find(self, workload: str, rate: float, contestant: str) -> RunStats | None:
        for stats in self.runs:
            if (stats.workload, stats.rate, stats.contestant) == (workload, rate, contestant):
                return stats
        return None


def _divide(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else float("nan")


def _s(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _lower(ratio: float) -> str:
    """A time ratio (reference / contestant) in words."""
    if math.isnan(ratio):
        return "-"
    return f"{ratio:.2f}x lower" if ratio >= 1 else f"{1 / ratio:.2f}x higher"


def _share(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


def run_table(report: RoutingReport, workload: str, rate: float) -> str:
    rows = [
        "| contestant | ok / sent | timeouts | req/s | tokens/s | req/s vs rr | TTFT p50 "
        "| TTFT p90 | TTFT p99 | TTFT p50 vs rr | TTFT p90 vs rr | e2e p50 | e2e p90 "
        "| cache hits | max deferred | max buffered | other CPUs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = report.find(workload, rate, REFERENCE)
    for name in report.config.contestants:
        stats = report.find(workload, rate, name)
        if stats is None:
            continue
        throughput = ttft50 = ttft90 = float("nan")
        if reference is not None:
            throughput = _divide(stats.requests_per_second, reference.requests_per_second)
            ttft50 = _divide(reference.ttft.p50, stats.ttft.p50)
            ttft90 = _divide(reference.ttft.p90, stats.ttft.p90)
        buffered = "-" if stats.max_buffered is None else f"{stats.max_buffered:g}"
        rows.append(
            f"| {name} | {stats.requests - stats.errors} / {stats.requests} | {stats.timeouts} "
            f"| {stats.requests_per_second:.2f} | {stats.tokens_per_second:.1f} "
            f"| {_x(throughput)} | {_s(stats.ttft.p50)} | {_s(stats.ttft.p90)} "
            f"| {_s(stats.ttft.p99)} | {_x(ttft50)} | {_x(ttft90)} | {_s(stats.total.p50)} "
            f"| {_s(stats.total.p90)} | {_share(stats.cache_hit_rate)} "
            f"| {stats.max_deferred:g} | {buffered} | {stats.other_cores:.2f} |"
        )
    return "\n".join(rows)


def headline(report: RoutingReport, workload: str) -> str:
    """paddler-prefix against the others at the workload's highest offered load."""
    rate = max(report.config.rates[workload])
    prefix = report.find(workload, rate, "paddler-prefix")
    rr = report.find(workload, rate, REFERENCE)
    least = report.find(workload, rate, "nginx-least-conn")
    if prefix is None or rr is None:
        return f"- {_LETTER[workload]} at {rate:g} req/s: needs paddler-prefix and {REFERENCE}."
    parts = [
        f"paddler-prefix {_x(_divide(prefix.requests_per_second, rr.requests_per_second))} the "
        f"throughput of {REFERENCE} ({prefix.requests_per_second:.2f} against "
        f"{rr.requests_per_second:.2f} req/s) and p90 TTFT {_s(prefix.ttft.p90)} s against "
        f"{_s(rr.ttft.p90)} s ({_lower(_divide(rr.ttft.p90, prefix.ttft.p90))})"
    ]
    if least is not None:
        parts.append(
            f"{_x(_divide(prefix.requests_per_second, least.requests_per_second))} the "
            "throughput of nginx-least-conn"
        )
    parts.append(
        f"cache hits {_share(prefix.cache_hit_rate)} against {_share(rr.cache_hit_rate)}; "
        f"requests_deferred max {prefix.max_deferred:g}"
    )
    return f"- **{_LETTER[workload]} at {rate:g} req/s:** " + "; ".join(parts) + "."


def section(report: RoutingReport, plot: str | None) -> str:
    config, hardware, versions = report.config, report.hardware, report.versions
    workloads = "\n".join(
        f"- {describe(name, config.chat, config.independent, config.mixed)}: "
        f"{config.requests[name]} requests per run at "
        f"{', '.join(f'{rate:g}' for rate in config.rates[name])} req/s."
        for name in config.workloads
    )
    tables = "\n\n".join(
        f"#### {_LETTER[name]} {name}, {rate:g} req/s offered\n\n{run_table(report, name, rate)}"
        for name in config.workloads
        for rate in config.rates[name]
    )
    figure = f"![TTFT p50 and p90 against offered load]({plot})\n\n" if plot else ""
    return f"""\
## Does prefix-cache-aware routing win?

Written by `{config.command}` on {report.started_at} (UTC), in \
{report.duration_seconds / 60:.0f} minutes. Generated: run the command again rather than \
editing this section. Raw results: `bench/results/routing-*.json`.

- Machine: {hardware.cpus} CPUs ({hardware.cpu_model}), {hardware.memory_gib:.1f} GiB, \
{hardware.kernel}; load average {hardware.load_before:.2f} when the run started.
- llama.cpp build `{versions.llamacpp_build}` through xllamacpp {versions.xllamacpp}; nginx \
{versions.nginx}; Paddler {versions.paddler}; aiohttp {versions.aiohttp}; Python \
{versions.python}.

### Headlines

At each workload's highest offered load:

{chr(10).join(headline(report, name) for name in config.workloads)}

{figure}### Backends and cache sizing

{config.servers} llama.cpp servers (xllamacpp, one process each, {config.threads} thread(s), \
{config.slots} slots of {config.context_per_slot} tokens, `--cache-ram {config.cache_ram_mib}` \
MiB) on a generated random-weight llama model (256-dim, 4 layers, feed-forward 768, byte-level \
tokenizer: one ASCII character is about one token), started afresh for every run, so that no \
contestant inherits another one's prompt cache.

{config.sizing.explain()}{_overridden(config)}

How llama.cpp's prompt cache behaves, measured on this build (cycling distinct 1565-token \
prompts through one server): a slot's state is saved to the RAM cache when the slot takes \
another prompt, and the cached state sharing the longest prefix is loaded back; a state costs \
4108 bytes per token here (6.24 MiB for 1593 tokens); eviction is least recently used by bytes; \
the token limit is raised to what the bytes allow (100 MiB held 16 such states, 25 000 tokens, \
with 4096 tokens of context); idle slots add about one state in all, not one each (2 or 4 slots \
with 40 MiB held 7 prompts in a cycle, and 8 thrashed). Every prompt shares the chat \
template's first ~21 tokens, so even a miss shows a few cached tokens.

### Method

{workloads}

Every workload is generated in full from seed {config.seed} before the first run: the same \
requests at the same offsets for every contestant, with open-loop Poisson arrivals (a request is \
sent at its time whether or not earlier ones are answered). The assistant turns in a chat's \
history are pre-generated, so no request depends on a server's answer. In (a), each arrival \
takes the next turn of a lane picked at random among the half of the lanes idle the longest, so \
that no proxy gets affinity by accident from a fixed cycle, and a turn is never sent before the \
answer to the session's previous turn has ended (it leaves at its time or then, whichever is \
later, and its latencies count from when it left). Each request is a \
streaming `POST /v1/chat/completions` with `max_tokens`, `"ignore_eos": true` and temperature 0, \
with a {config.request_timeout:g} s deadline. Contestants, in turn at each offered load (the \
order rotating): `direct` (everything to server 0), `nginx-rr` (nginx round robin), \
`nginx-least-conn` (nginx `least_conn`; both one worker, `proxy_buffering off`, upstream \
keep-alive), `paddler-slots` and `paddler-prefix` (`paddler balancer --routing slots|prefix` with \
an agent per server with its default settings, \
{" ".join(f"`{flag}`" for flag in config.paddler_flags)}).

Throughput is completed requests (and their generated tokens) over the time from the first send \
to the last completion. TTFT runs to the first chunk with content; e2e to the end of the stream. \
Cache hits are llama.cpp's own numbers from each final chunk's `timings`: \
sum of `cache_n` / sum of (`cache_n` + `prompt_n`). "max deferred" is the highest \
`llamacpp:requests_deferred` (all servers together) seen polling `/metrics` every \
{config.poll_interval * 1000:.0f} ms; "max buffered" is Paddler's `requests_buffered`. Ratios \
are against nginx-rr: req/s as contestant / nginx-rr, TTFT as nginx-rr / contestant, so above \
1x is better in both. Latencies in seconds. "other CPUs" is how many CPUs processes outside the \
benchmark kept busy on average during the run: anything well above 0 means that run was \
disturbed.

Each cell is a single run (a full sweep has to fit in about half an hour on 2 cores), so \
differences of 10-20 % between contestants with the same cache hit rate are within run-to-run \
noise; differences that come with a different cache hit rate are the effect being measured. \
Every request of a run counts, including the first turn of every session, which no routing \
can serve from a cache: the best possible hit rate of a run is below 100 %.

### Results

{tables}

### Checks

{checks(report)}
"""


def _overridden(config: RoutingConfig) -> str:
    if config.cache_ram_mib == config.sizing.cache_ram_mib:
        return ""
    return f" This run overrode it: `--cache-ram-mib {config.cache_ram_mib}`."


def checks(report: RoutingReport) -> str:
    errors = sum(stats.errors for stats in report.runs)
    sent = sum(stats.requests for stats in report.runs)
    other = max((stats.other_cores for stats in report.runs), default=0.0)
    lines = [
        f"- Errors: {errors} of {sent} requests "
        f"({sum(stats.timeouts for stats in report.runs)} timeouts).",
        f"- Other processes on the machine kept up to {other:.2f} CPUs busy during a run "
        "(the servers, the proxies and the client share these CPUs).",
    ]
    examples: dict[str, int] = {}
    for stats in report.runs:
        for error, count in stats.error_examples.items():
            examples[error] = examples.get(error, 0) + count
    lines += [f"  - `{error[:160]}` ({count} times)" for error, count in list(examples.items())[:5]]
    scraped = any(stats.paddler_metrics for stats in report.runs)
    lines.append(
        "- Paddler's `paddler_prefix*` and `paddler_routing*` metrics, scraped after each "
        + ("Paddler run, are in the JSON." if scraped else "Paddler run: none were exposed.")
    )
    return "\n".join(lines)


_MARKED = re.compile(r"<!-- ([\w.-]+):begin -->.*?<!-- \1:end -->", re.S)


def marked_sections(document: str) -> list[str]:
    """Every section of ``document`` between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``,
    markers included, in order: what the other benchmarks wrote, for one that rewrites the rest."""
    return [match.group(0) for match in _MARKED.finditer(document)]


def replace_section(document: str, body: str, begin: str = BEGIN, end_marker: str = END) -> str:
    """``document`` with what lies between the markers replaced by ``body``."""
    block = f"{begin}\n{body.rstrip()}\n{end_marker}"
    start, end = document.find(begin), document.find(end_marker)
    if start == -1 or end == -1 or end < start:
        if not document:
            return f"{block}\n"
        return document + ("\n" if document.endswith("\n") else "\n\n") + f"{block}\n"
    return document[:start] + block + document[end + len(end_marker) :]


def write_section(output: Path, body: str, begin: str, end_marker: str) -> None:
    """Put ``body`` between the markers in ``output`` (created if missing), and say so."""
    existing = output.read_text() if output.exists() else ""
    output.write_text(replace_section(existing, body, begin, end_marker))
    say(f"report: {output} (between {begin} and {end_marker})")


def write_json(report: RoutingReport, path: Path) -> None:
    document: dict[str, Any] = {
        "started_at": report.started_at,
        "duration_seconds": report.duration_seconds,
        "config": asdict(report.config),
        "hardware": asdict(report.hardware),
        "versions": asdict(report.versions),
        "runs": [
            {**asdict(stats), "cache_hit_rate": stats.cache_hit_rate} for stats in report.runs
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(document), indent=1) + "\n")


def write_outputs(report: RoutingReport, stamp: str, say: Callable[[str], None]) -> None:
    config = report.config
    json_path = config.results_dir / f"routing-{stamp}.json"
    write_json(report, json_path)
    say(f"raw results: {json_path}")
    plot_link = None
    if config.plot is not None:
        titles = {name: f"{_LETTER[name]} {name}" for name in config.workloads}
        plot_ttft(report.runs, config.workloads, titles, config.contestants, config.plot)
        say(f"plot: {config.plot}")
        if config.output is not None:
            plot_link = os.path.relpath(config.plot, config.output.parent)
    body = section(report, plot_link)
    print(body, flush=True)
    if config.output is not None:
        existing = config.output.read_text() if config.output.exists() else ""
        config.output.parent.mkdir(parents=True, exist_ok=True)
        config.output.write_text(replace_section(existing, body))
        say(f"report: {config.output} (between {BEGIN} and {END})")
