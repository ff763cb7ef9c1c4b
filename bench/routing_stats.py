"""From one run (a contestant at an offered load on a workload) to its numbers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bench.open_loop import OpenLoopRun
from bench.queue_watch import QueuePeaks, QueueSample
from bench.stats import Percentiles

SCRAPED_PREFIXES = ("paddler_prefix", "paddler_routing")
"""Paddler metrics kept from the balancer's /metrics after each Paddler run."""


@dataclass(frozen=True)
class RunStats:
    workload: str
    rate: float
    """Offered load, requests per second."""
    contestant: str
    requests: int
    errors: int
    """Failed requests, timeouts included."""
    timeouts: int
    requests_per_second: float
    """Completed requests over the span from the first send to the last completion."""
    tokens_per_second: float
    """Generated tokens of completed requests over the same span."""
    span_seconds: float
    ttft: Percentiles
    total: Percentiles
    cache_n: int
    """Prompt tokens llama.cpp took from its cache, over completed requests."""
    prompt_n: int
    """Prompt tokens llama.cpp computed."""
    max_deferred: float
    """The most requests waiting in llama.cpp's own queues at one poll, all servers together."""
    max_buffered: float | None
    """Paddler's most buffered requests at one poll; None for the others."""
    other_cores: float
    """CPUs that processes outside the benchmark kept busy, on average over the run."""
    paddler_metrics: str
    """Raw Prometheus text of the balancer's ``paddler_prefix*`` and ``paddler_routing*``."""
    error_examples: dict[str, int]

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens served from llama.cpp's cache: cache_n / (cache_n + prompt_n)."""
        seen = self.cache_n + self.prompt_n
        return self.cache_n / seen if seen else float("nan")


def run_stats(
    workload: str,
    rate: float,
    contestant: str,
    run: OpenLoopRun,
    queue_samples: list[QueueSample],
    other_cores: float,
    paddler_metrics: str,
) -> RunStats:
    good = [sample for sample in run.samples if sample.ok]
    errors = Counter(sample.error for sample in run.samples if sample.error is not None)
    peaks = QueuePeaks.of(queue_samples)
    span = run.span
    return RunStats(
        workload=workload,
        rate=rate,
        contestant=contestant,
        requests=len(run.samples),
        errors=len(run.samples) - len(good),
        timeouts=sum(count for error, count in errors.items() if error.startswith("timeout")),
        requests_per_second=len(good) / span if span > 0 else 0.0,
        tokens_per_second=sum(sample.tokens for sample in good) / span if span > 0 else 0.0,
        span_seconds=span,
        ttft=Percentiles.of([sample.ttft for sample in good if sample.ttft is not None]),
        total=Percentiles.of([sample.total for sample in good if sample.total is not None]),
        cache_n=sum(sample.cache_n for sample in good),
        prompt_n=sum(sample.prompt_n for sample in good),
        max_deferred=peaks.max_deferred,
        max_buffered=peaks.max_buffered,
        other_cores=other_cores,
        paddler_metrics=paddler_metrics,
        error_examples=dict(errors.most_common(3)),
    )


def scraped_metrics(exposition: str) -> str:
    """The lines of ``exposition`` (HELP and TYPE included) about the metrics worth keeping."""
    kept = []
    for line in exposition.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else line
        if name.startswith(SCRAPED_PREFIXES):
            kept.append(line)
    return "\n".join(kept)
