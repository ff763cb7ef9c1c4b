"""What one cell of the scale benchmark costs each party, and the cells built on wrk and streams.

A ``Meter`` names the processes to count (the proxy, the fast upstream, the simulated agents,
...), reads their CPU from ``/proc`` before and after a cell (children included: nginx's
worker, the balancer's traits worker), adds wrk's (``RUSAGE_CHILDREN``) and this process's, and
the machine's other and stolen CPU, so that every cell says whether the proxy was what ran out.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import CpuParties
from bench.paced_streams import StreamsResult, paced_streams
from bench.wrk import WrkResult, run_wrk


@dataclass(frozen=True)
class Usage:
    wall: float
    cpu: dict[str, float]
    """CPU seconds of each named party, ``client`` (this process) and ``wrk``."""
    other: float
    """CPU seconds of everything else on the machine."""
    stolen: float

    def cores(self, party: str) -> float:
        return self.cpu.get(party, 0.0) / self.wall if self.wall > 0 else 0.0


class Meter:
    def __init__(self, parties: Mapping[str, int]) -> None:
        self._parties = CpuParties({name: (pid,) for name, pid in parties.items()})

    def start(self) -> dict[str, float]:
        snapshot = self._parties.snapshot()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        snapshot["wrk"] = children.ru_utime + children.ru_stime
        snapshot["_wall"] = time.perf_counter()
        return snapshot

    def since(self, before: dict[str, float]) -> Usage:
        after = self.start()
        wall = after.pop("_wall") - before["_wall"]
        wrk = after.pop("wrk") - before["wrk"]
        used = CpuParties.used(
            {k: v for k, v in before.items() if k not in ("_wall", "wrk")}, after
        )
        # wrk ran outside the parties, so the machine's "other" counted it: take it out.
        return Usage(wall, {**used.parties, "wrk": wrk}, max(0.0, used.other - wrk), used.stolen)


@dataclass
class LoadCell:
    """A wrk cell: small requests, or streams whose events the upstream counted."""

    contestant: str
    kind: str
    connections: int
    requests: int
    requests_per_second: float
    errors: dict[str, int]
    p50: float
    p99: float
    usage: Usage
    events: int = 0
    """SSE events the fast upstream sent during the cell (stream cells)."""
    round: int = 0
    """Which round of its kind (``ScaleConfig.load_rounds``)."""

    def ms_per(self, party: str, count: int) -> float:
        return self.usage.cpu.get(party, 0.0) / count * 1000 if count else float("nan")

    @property
    def proxy_ms_per_request(self) -> float:
        return self.ms_per("proxy", self.requests)

    @property
    def proxy_us_per_event(self) -> float:
        return self.ms_per("proxy", self.events) * 1000


async def wrk_cell(
    meter: Meter,
    contestant: str,
    kind: str,
    url: str,
    script: Path,
    connections: int,
    seconds: float,
    upstream_stats: Any = None,
) -> LoadCell:
    """Run wrk; ``upstream_stats``: an async callable whose ``events`` count is read around it."""
    events_before = (await upstream_stats())["events"] if upstream_stats else 0
    before = meter.start()
    result: WrkResult = await run_wrk(url, script, connections=connections, seconds=seconds)
    usage = meter.since(before)
    events = (await upstream_stats())["events"] - events_before if upstream_stats else 0
    return LoadCell(
        contestant=contestant,
        kind=kind,
        connections=connections,
        requests=result.requests,
        requests_per_second=result.requests_per_second,
        errors={name: count for name, count in result.errors.items() if count},
        p50=result.p50,
        p99=result.p99,
        usage=usage,
        events=events,
    )


@dataclass
class StreamCell:
    contestant: str
    streams: int
    requests: int
    ttft_p50: float
    ttft_p99: float
    errors: int
    resent: int
    usage: Usage
    examples: list[str] = field(default_factory=list)


async def stream_cell(
    meter: Meter,
    contestant: str,
    url: str,
    body: dict[str, Any],
    *,
    streams: int,
    seconds: float,
    warmup: float,
    spread: float,
) -> StreamCell:
    before = meter.start()
    result: StreamsResult = await paced_streams(
        url, "/completion", body, streams=streams, seconds=seconds, warmup=warmup, spread=spread
    )
    usage = meter.since(before)
    return StreamCell(
        contestant=contestant,
        streams=streams,
        requests=result.requests,
        ttft_p50=percentile(result.ttfts, 50),
        ttft_p99=percentile(result.ttfts, 99),
        errors=result.errors,
        resent=result.resent,
        usage=usage,
        examples=result.examples,
    )


def percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_average() -> float:
    return os.getloadavg()[0]
