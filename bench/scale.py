"""Flat cost at fleet scale (issue 10): direct, nginx and Paddler on a fast fake llama.cpp.

Usage: ``./scripts/bench scale [--quick] [--label before|after|...] [--paddler-flag FLAG ...]``
(or ``python -m bench.scale`` inside the venv). A full run took 4.6 minutes here (every cell has
a cap), ``--quick`` 1.6. It measures, in one run on this machine:

- CPU per small proxied request (Paddler and nginx, and their ratio), latency p50/p99;
- added TTFT over direct at 1, 16 and 64 paced streams; CPU per relayed SSE event;
- memory per open stream (Paddler and nginx);
- a fleet-size sweep (2, 100, 1,000 simulated agents): CPU per request, p50, and the
  balancer's CPU for the agents' reports alone;
- a buffer sweep (100, 1,000, 10,000 requests waiting with no free slot): admission rate,
  ``/health`` latency throughout, RSS, and whether departures keep FIFO order.

It writes ``bench/results/scale-<time>.json`` and its section of docs/benchmarks.md for
``--label`` (one section per label: the baseline stays when a fix is measured). Every helper
process is stopped when the run ends, however it ends; each cell has a time cap.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from bench.environment import hardware
from bench.nginx import nginx_version
from bench.processes import raise_open_file_limit
from bench.routing_report import write_section
from bench.runner import run, say
from bench.scale_buffer import measure_buffers
from bench.scale_config import ScaleConfig, parse_config
from bench.scale_contestants import CONTESTANTS, measure_contestants
from bench.scale_fleet import measure_fleets
from bench.scale_measure import load_average
from bench.scale_report import ScaleReport, markers, section, write_json
from bench.wrk import wrk_binary


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


async def benchmark(config: ScaleConfig, workdir: Path, started_at: str, stamp: str) -> int:
    wrk_binary()  # fail before anything starts if wrk is missing
    limit = raise_open_file_limit()
    needed = max(config.buffer_sizes, default=0) + 1024
    if limit < needed:
        raise RuntimeError(
            f"the open-file limit is {limit}; the buffer sweep needs {needed} (raise ulimit -Hn)"
        )
    load_before = load_average()
    began = time.perf_counter()
    versions = {
        "Paddler": _version("paddler"),
        "aiohttp": _version("aiohttp"),
        "Python": platform.python_version(),
        "uvloop (the helpers')": _version("uvloop"),
        "nginx": await nginx_version(),
    }
    say(f"contestants: {', '.join(CONTESTANTS)}")
    contestants = await measure_contestants(config, workdir)
    say("fleet sweep")
    fleets = await measure_fleets(config, workdir)
    say("buffer sweep")
    buffers = await measure_buffers(config, workdir)
    report = ScaleReport(
        config=config,
        started_at=started_at,
        duration_seconds=time.perf_counter() - began,
        hardware=hardware(load_before),
        versions=versions,
        contestants=contestants,
        fleets=fleets,
        buffers=buffers,
    )
    json_path = config.results_dir / f"scale-{config.label}-{stamp}.json"
    write_json(report, json_path)
    say(f"raw results: {json_path}")
    body = section(report)
    print(body, flush=True)
    if config.output is not None:
        write_section(config.output, body, *markers(config.label))
    return 0


def main() -> NoReturn:
    config = parse_config()
    run(
        lambda workdir, started_at, stamp: benchmark(config, workdir, started_at, stamp),
        name="scale",
        results_dir=config.results_dir,
        keep_logs=config.keep_logs,
    )


if __name__ == "__main__":
    main()
