"""From the runs of one cell (a contestant at a concurrency) to its numbers, and cells to ratios."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from bench.load import Run
from bench.queue_watch import QueuePeaks, QueueSample


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
    queues: QueuePeaks
    """While measured requests ran."""
    max_deferred_whole_run: float
    """``requests_deferred`` over whole runs, warm-up and cool-down included."""
    cpu_ms_per_request: dict[str, float]
    """CPU milliseconds per request of each party: ``client``, ``proxy``, ``llamacpp``."""
    other_cores_max: float
    """The most CPUs that processes outside the benchmark kept busy during one counted run."""
    stolen_cores_mean: float
    stolen_cores_max: float
    repeated_runs: int
    ttft_p50_by_round: list[float]
    total_p50_by_round: list[float]
    error_examples: dict[str, int]


@dataclass(frozen=True)
class RunOutcome:
    run: Run
    queue_samples: list[QueueSample]
    cpu_seconds: dict[str, float]
    """CPU seconds of each party during the run."""
    requests_sent: int
    """Every request of the run, warm-up and cool-down included: CPU time covers them all."""
    other_cores: float
    """CPUs kept busy on average by processes outside the benchmark."""
    stolen_cores: float
    """CPUs' worth of time the hypervisor gave to other machines, on average."""


@dataclass
class Cell:
    """Collects the runs of one cell over the rounds."""

    contestant: str
    concurrency: int
    runs: list[Run] = field(default_factory=list)
    queue_samples: list[QueueSample] = field(default_factory=list)
    measured_queue_samples: list[QueueSample] = field(default_factory=list)
    cpu_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    requests_sent: int = 0
    other_cores: list[float] = field(default_factory=list)
    stolen_cores: list[float] = field(default_factory=list)
    repeated_runs: int = 0
    """Runs measured again because other processes used the CPUs meanwhile."""

    def add(self, outcome: RunOutcome) -> None:
        run = outcome.run
        self.runs.append(run)
        for name, seconds in outcome.cpu_seconds.items():
            self.cpu_seconds[name] += seconds
        self.requests_sent += outcome.requests_sent
        self.other_cores.append(outcome.other_cores)
        self.stolen_cores.append(outcome.stolen_cores)
        self.queue_samples += outcome.queue_samples
        self.measured_queue_samples += [
            sample
            for sample in outcome.queue_samples
            if run.window_start <= sample.at <= run.window_end
        ]

    def stats(self) -> CellStats:
        samples = [sample for run in self.runs for sample in run.samples]
        good = [sample for sample in samples if sample.ok]
        wall = sum(run.wall for run in self.runs)
        errors = Counter(sample.error for sample in samples if sample.error is not None)
        errors.update(
            f"(warm-up or cool-down) {error}"
            for run in self.runs
            for error in run.unmeasured_errors
        )
        return CellStats(
            contestant=self.contestant,
            concurrency=self.concurrency,
            requests=len(samples),
            errors=len(samples) - len(good),
            unmeasured_errors=sum(len(run.unmeasured_errors) for run in self.runs),
            ttft=Percentiles.of([sample.ttft for sample in good if sample.ttft is not None]),
            total=Percentiles.of([sample.total for sample in good if sample.total is not None]),
            requests_per_second=len(good) / wall if wall else 0.0,
            tokens_per_second=sum(sample.tokens for sample in good) / wall if wall else 0.0,
            wall_seconds=wall,
            queues=QueuePeaks.of(self.measured_queue_samples),
            max_deferred_whole_run=QueuePeaks.of(self.queue_samples).max_deferred,
            cpu_ms_per_request={
                name: 1000 * seconds / self.requests_sent if self.requests_sent else 0.0
                for name, seconds in self.cpu_seconds.items()
            },
            other_cores_max=max(self.other_cores, default=0.0),
            stolen_cores_mean=(
                sum(self.stolen_cores) / len(self.stolen_cores) if self.stolen_cores else 0.0
            ),
            stolen_cores_max=max(self.stolen_cores, default=0.0),
            repeated_runs=self.repeated_runs,
            ttft_p50_by_round=[
                percentile([s.ttft for s in run.samples if s.ok and s.ttft is not None], 50)
                for run in self.runs
            ],
            total_p50_by_round=[
                percentile([s.total for s in run.samples if s.ok and s.total is not None], 50)
                for run in self.runs
            ],
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
