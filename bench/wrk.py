"""Closed-loop HTTP load from ``wrk`` (Debian's), with POST JSON bodies from a Lua script.

wrk is written in C on an epoll loop: at the request rates a Python proxy reaches it costs a
fraction of a core, where a Python load generator would cost as much as the proxy it measures.
Its CPU is still counted (``cpu_seconds``, from ``RUSAGE_CHILDREN`` around the run: wrk is the
only child reaped meanwhile), so that a cell where wrk was the bottleneck shows it.

The script's ``done`` hook prints one line, ``WRK_JSON {...}``, with the counts and latency
percentiles in microseconds; ``parse`` reads it, ignoring wrk's human-readable report.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "WRK_JSON "

_DONE = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def lua_script(path: str, body: dict[str, Any]) -> str:
    """A wrk script that POSTs ``body`` as JSON to ``path`` and reports in ``WRK_JSON``."""
    return (
        'wrk.method = "POST"\n'
        f"wrk.path = {_lua_string(path)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {_lua_string(json.dumps(body, separators=(',', ':')))}\n" + _DONE
    )


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    """connect, read, write, status (non-2xx/3xx), timeout."""
    p50: float
    p90: float
    p99: float
    max: float
    mean: float
    """Latencies in seconds."""
    cpu_seconds: float = 0.0
    """wrk's own CPU over the run."""

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def parse(output: str) -> WrkResult:
    """The ``WRK_JSON`` line of wrk's output; ValueError if there is none."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            fields = json.loads(line[len(MARKER) :])
            break
    else:
        raise ValueError(f"wrk printed no {MARKER.strip()} line:\n{output[-2000:]}")
    return WrkResult(
        requests=fields["requests"],
        seconds=fields["duration_us"] / 1e6,
        errors={name: fields[name] for name in ("connect", "read", "write", "status", "timeout")},
        p50=fields["p50_us"] / 1e6,
        p90=fields["p90_us"] / 1e6,
        p99=fields["p99_us"] / 1e6,
        max=fields["max_us"] / 1e6,
        mean=fields["mean_us"] / 1e6,
    )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (./scripts/bench installs it)")
    return found


async def run_wrk(
    url: str, script: Path, *, connections: int, seconds: float, threads: int = 1
) -> WrkResult:
    """Run wrk against ``url`` for ``seconds`` with ``connections`` kept busy."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = await asyncio.create_subprocess_exec(
        wrk_binary(),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout=30s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(seconds + 60):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with code {process.returncode}:\n{output.decode()[-2000:]}")
    result = parse(output.decode(errors="replace"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkResult(**{**result.__dict__, "cpu_seconds": cpu})
