"""Direct, nginx, a bare Python hop and Paddler side by side on the fast upstream: the lean
data plane's cells.

All of them run at once against the same fast upstream (``servers`` simulated llama.cpp
servers, Paddler with as many simulated agents), and take turns cell by cell, the order
rotating, so that the machine's drift spreads over them. The Python hop
(``bench.proxy_floor.httptools_hop``, to the first server) is the floor of a proxy written in
Python on this machine: the same HTTP layer as Paddler's (httptools on uvloop, a pooled
connection, the one after a stream opened at its head) and no logic at all, so that what
Paddler adds to it is what its routing, accounting and observing cost.

- small requests (``POST /completion``, ``n_predict`` 1, not streamed, from wrk): at
  ``latency_connections`` for p50/p99 when nothing queues, at ``load_connections`` for CPU per
  request at the proxy's ceiling;
- paced streams at each of ``stream_counts``: TTFT (``paced_streams``);
- long streams from wrk: CPU per relayed SSE event (the upstream counts the events it sent);
- ``memory_streams`` slow streams held open (``held_requests``): RSS per open stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.child_control import running_child
from bench.memory import tree_rss_bytes
from bench.nginx import running_nginx
from bench.processes import running_hop
from bench.runner import say
from bench.scale_config import ScaleConfig
from bench.scale_measure import LoadCell, Meter, StreamCell, stream_cell, wrk_cell
from bench.simulated_fleet import running_fleet, running_upstream
from bench.wrk import lua_script

CONTESTANTS = ("direct", "nginx", "python-hop", "paddler")
PYTHON_HOP = (sys.executable, "-m", "bench.proxy_floor.httptools_hop")
SMALL_BODY = {"prompt": "Say hi", "n_predict": 1}


@dataclass
class MemoryCell:
    contestant: str
    streams: int
    opened: int
    failed: int
    rss_before: int
    rss_open: int
    seconds_to_open: float

    @property
    def bytes_per_stream(self) -> float:
        return (self.rss_open - self.rss_before) / self.opened if self.opened else float("nan")


@dataclass
class ContestantResults:
    small: list[LoadCell] = field(default_factory=list)
    streams: list[StreamCell] = field(default_factory=list)
    chunks: list[LoadCell] = field(default_factory=list)
    memory: list[MemoryCell] = field(default_factory=list)


def _rotated(turn: int) -> Sequence[str]:
    shift = turn % len(CONTESTANTS)
    return CONTESTANTS[shift:] + CONTESTANTS[:shift]


async def measure_contestants(config: ScaleConfig, workdir: Path) -> ContestantResults:
    results = ContestantResults()
    flags = ["--max-client-connections=4096", *config.paddler_flags]
    async with (
        running_upstream(
            config.servers, config.slots, workdir, "fast-upstream-contestants"
        ) as upstream,
        running_nginx(upstream.backends(config.servers), workdir) as nginx,
        running_hop(PYTHON_HOP, upstream.ports[0], workdir / "python-hop.log") as (hop, hop_pid),
        running_fleet(
            upstream, config.servers, workdir, flags, name="paddler-contestants"
        ) as fleet,
    ):
        urls = {
            "direct": upstream.url(0),
            "nginx": nginx.url,
            "python-hop": hop,
            "paddler": fleet.paddler.proxy_url,
        }
        proxies = {"nginx": nginx.pid, "python-hop": hop_pid, "paddler": fleet.paddler.balancer_pid}
        meters = {
            name: Meter(
                {"upstream": upstream.child.pid, "agents": fleet.agents.pid}
                | ({"proxy": proxies[name]} if name in proxies else {})
            )
            for name in CONTESTANTS
        }
        small = workdir / "small.lua"
        small.write_text(lua_script("/completion", SMALL_BODY))
        chunky = workdir / "chunks.lua"
        chunk_body = {
            "prompt": "Say hi",
            "n_predict": config.chunk_tokens,
            "stream": True,
            "bench_interval_ms": config.chunk_interval_ms,
        }
        chunky.write_text(lua_script("/completion", chunk_body))
        for name in CONTESTANTS:  # warm-up: pools filled, code paths hot
            await wrk_cell(
                meters[name], name, "warm-up", urls[name], small, config.load_connections, 1.0
            )
        turn = 0
        cells = [("latency", config.latency_connections, 0)] + [
            ("load", config.load_connections, round_number)
            for round_number in range(config.load_rounds)
        ]
        for kind, connections, round_number in cells:
            for name in _rotated(turn):
                cell = await wrk_cell(
                    meters[name], name, kind, urls[name], small, connections, config.cell_seconds
                )
                cell.round = round_number
                results.small.append(cell)
                say(
                    f"small {kind} {name}: {cell.requests_per_second:.0f} req/s, p50 "
                    f"{cell.p50 * 1000:.2f} ms, proxy {cell.proxy_ms_per_request:.3f} ms CPU/request"
                )
            turn += 1
        stream_body = {
            "prompt": "Say hi",
            "n_predict": config.stream_tokens,
            "stream": True,
            "bench_first_ms": config.stream_first_ms,
            "bench_interval_ms": config.stream_interval_ms,
        }
        spread = (config.stream_first_ms + config.stream_tokens * config.stream_interval_ms) / 1000
        for streams in config.stream_counts:
            for name in _rotated(turn):
                stream = await stream_cell(
                    meters[name],
                    name,
                    urls[name],
                    stream_body,
                    streams=streams,
                    seconds=config.stream_seconds,
                    warmup=config.stream_warmup,
                    spread=spread,
                )
                results.streams.append(stream)
                say(
                    f"{streams} streams {name}: TTFT p50 {stream.ttft_p50 * 1000:.2f} ms, p99 {stream.ttft_p99 * 1000:.2f} ms"
                )
            turn += 1
        for name in _rotated(turn):
            cell = await wrk_cell(
                meters[name], name, "chunks", urls[name], chunky, config.chunk_streams,
                config.cell_seconds + 1, upstream_stats=lambda: upstream.child.ask("stats"),
            )  # fmt: skip
            results.chunks.append(cell)
            say(
                f"chunks {name}: {cell.events} events, proxy {cell.proxy_us_per_event:.1f} µs CPU/event"
            )
        for name in ("nginx", "paddler"):
            memory = await memory_cell(name, urls[name], proxies[name], config, workdir)
            results.memory.append(memory)
            say(
                f"memory {name}: {memory.opened} streams open, "
                f"{memory.bytes_per_stream / 1024:.1f} KiB each"
            )
    return results


async def memory_cell(
    name: str, url: str, pid: int, config: ScaleConfig, workdir: Path, cap: float = 60.0
) -> MemoryCell:
    """Open ``memory_streams`` slow streams through ``url``; RSS of ``pid`` before and once all
    have their first event."""
    body: dict[str, Any] = {
        "prompt": "Say hi",
        "n_predict": 100_000,
        "stream": True,
        "bench_interval_ms": 1000,
    }
    count = config.memory_streams
    args = (url, "/completion", json.dumps(body), f"--count={count}")
    async with running_child(
        f"held-streams-{name}", "bench.held_requests", *args, workdir=workdir
    ) as held:
        before = tree_rss_bytes(pid)
        started = time.perf_counter()
        await held.ask("start")
        stats = await held.ask("stats")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cap):
                while stats["first_event"] + stats["failed"] < count:
                    await asyncio.sleep(0.2)
                    stats = await held.ask("stats")
        opened_at = time.perf_counter()
        await asyncio.sleep(1.0)  # every stream has had a second event through the proxy
        rss_open = tree_rss_bytes(pid)
        await held.ask("close")
    return MemoryCell(
        contestant=name,
        streams=count,
        opened=stats["first_event"],
        failed=stats["failed"],
        rss_before=before,
        rss_open=rss_open,
        seconds_to_open=opened_at - started,
    )
