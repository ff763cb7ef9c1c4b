"""The scale benchmark's settings: one frozen config, full or ``--quick``, built from its flags."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScaleConfig:
    command: str
    label: str
    """Names the section of docs/benchmarks.md ("before", "after", ...): one per label."""
    quick: bool = False
    slots: int = 512
    """Slots of each simulated server (contestants and fleet sweep): more than any cell uses."""
    servers: int = 2
    """Simulated servers behind nginx and Paddler in the contestants' cells."""
    cell_seconds: float = 5.0
    load_rounds: int = 3
    """Rounds of the throughput cells (CPU per request), each contestant once a round in
    rotating order: the headline is the median, as one 5 s cell on these shared cores moves by
    up to 2x from run to run."""
    """Length of each wrk cell."""
    latency_connections: int = 1
    """wrk connections of the latency cells: p50/p99 of a proxy that is not saturated."""
    load_connections: int = 32
    """wrk connections of the throughput cells: CPU per request at the proxy's ceiling."""
    stream_counts: tuple[int, ...] = (1, 16, 64)
    stream_seconds: float = 4.0
    stream_warmup: float = 0.5
    stream_tokens: int = 20
    stream_first_ms: int = 10
    stream_interval_ms: int = 10
    chunk_streams: int = 64
    chunk_tokens: int = 100
    chunk_interval_ms: int = 10
    memory_streams: int = 1000
    fleet_sizes: tuple[int, ...] = (2, 100, 1000)
    idle_seconds: float = 5.0
    buffer_sizes: tuple[int, ...] = (100, 1000, 10000)
    buffer_slots: int = 4
    """Slots of each of the buffer sweep's 2 servers: few, so that departures show their order."""
    fill_cap: float = 60.0
    drain_cap: float = 30.0
    probe_interval: float = 0.1
    paddler_flags: tuple[str, ...] = ()
    """Extra ``paddler balancer`` flags for every balancer of the run."""
    output: Path | None = ROOT / "docs" / "benchmarks.md"
    results_dir: Path = ROOT / "bench" / "results"
    keep_logs: bool = False


QUICK = {
    "cell_seconds": 2.0,
    "load_rounds": 1,
    "stream_seconds": 1.5,
    "stream_warmup": 0.3,
    "memory_streams": 300,
    "idle_seconds": 2.0,
    "buffer_sizes": (100, 1000),
    "fill_cap": 15.0,
    "drain_cap": 10.0,
}


def parse_config(argv: Sequence[str] | None = None) -> ScaleConfig:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="./scripts/bench scale",
        description="Flat cost at fleet scale (issue 10): direct, nginx and Paddler against a "
        "fast fake llama.cpp; CPU per request and per chunk, added TTFT, a fleet-size sweep, a "
        "buffer sweep and memory per stream. Writes its section of docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    parser.add_argument(
        "--label",
        default="latest",
        help='names the section written ("before" for the baseline, "after" for a fix; '
        "one section per label, others are left alone)",
    )
    parser.add_argument(
        "--paddler-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="an extra flag for every paddler balancer (repeatable), e.g. --paddler-flag=--routing=slots",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-output", action="store_true", help="print the section only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parsed = parser.parse_args(arguments)
    config = ScaleConfig(
        command=shlex.join(["./scripts/bench", "scale", *arguments]),
        label=parsed.label,
        quick=parsed.quick,
        paddler_flags=tuple(parsed.paddler_flag),
        output=None if parsed.no_output else parsed.output,
        keep_logs=parsed.keep_logs,
    )
    return replace(config, **QUICK) if parsed.quick else config  # type: ignore[arg-type]
