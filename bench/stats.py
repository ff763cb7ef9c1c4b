"""From the runs of one cell (a contestant at a concurrency) to its numbers, and cells to ratios."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bench.load import Run
from bench.queue_watch import Peaks


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(frozen=True)
class Percentiles:
    """Seconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        return cls(percentile(values, 50), percentile(values, 90), percentile(values, 99))


@dataclass(frozen=True)
class CellStats:
    contestant: str
    concurrency: int
    requests: int
    errors: int
    unmeasured_errors: int
    """Failures among the warm-up and cool-down requests, which are not in ``requests``."""
    ttft: Percentiles
    total: Percentiles
    requests_per_second: float
    tokens_per_second: float
    wall_seconds: float
    max_deferred: float
    max_processing: float
    max_buffered: float | None
    queue_polls: int
    error_examples: dict[str, int]


@dataclass
class Cell:
    """Collects the runs of one cell over the rounds."""

    contestant: str
    concurrency: int
    runs: list[Run] = field(default_factory=list)
    peaks: Peaks = field(default_factory=Peaks)

    def add(self, run: Run, peaks: Peaks) -> None:
        self.runs.append(run)
        self.peaks.merge(peaks)

    def stats(self) -> CellStats:
        samples = [sample for run in self.runs for sample in run.samples]
        good = [sample for sample in samples if sample.ok]
        wall = sum(run.wall for run in self.runs)
        errors = Counter(sample.error for sample in samples if sample.error is not None)
        return CellStats(
            contestant=self.contestant,
            concurrency=self.concurrency,
            requests=len(samples),
            errors=len(samples) - len(good),
            unmeasured_errors=sum(run.unmeasured_errors for run in self.runs),
            ttft=Percentiles.of([sample.ttft for sample in good if sample.ttft is not None]),
            total=Percentiles.of([sample.total for sample in good if sample.total is not None]),
            requests_per_second=len(good) / wall if wall else 0.0,
            tokens_per_second=sum(sample.tokens for sample in good) / wall if wall else 0.0,
            wall_seconds=wall,
            max_deferred=self.peaks.deferred,
            max_processing=self.peaks.processing,
            max_buffered=self.peaks.buffered,
            queue_polls=self.peaks.polls,
            error_examples=dict(errors.most_common(5)),
        )


@dataclass(frozen=True)
class Ratios:
    """A contestant's percentiles divided by the baseline's at the same concurrency."""

    contestant: str
    concurrency: int
    ttft_p50: float
    ttft_p90: float
    total_p50: float
    total_p90: float
    ttft_p50_added: float
    """Seconds added to the median TTFT."""
    total_p50_added: float


def ratios(cell: CellStats, baseline: CellStats) -> Ratios:
    def divide(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return Ratios(
        contestant=cell.contestant,
        concurrency=cell.concurrency,
        ttft_p50=divide(cell.ttft.p50, baseline.ttft.p50),
        ttft_p90=divide(cell.ttft.p90, baseline.ttft.p90),
        total_p50=divide(cell.total.p50, baseline.total.p50),
        total_p90=divide(cell.total.p90, baseline.total.p90),
        ttft_p50_added=cell.ttft.p50 - baseline.ttft.p50,
        total_p50_added=cell.total.p50 - baseline.total.p50,
    )
