"""The buffer sweep: 100, 1,000 and 10,000 requests waiting with no free slot, then released.

For each size a fresh ``paddler balancer`` (``--request-buffer-size`` N,
``--request-buffer-timeout`` long enough never to bite, ``--max-client-connections`` N plus
room) gets 2 simulated agents that report every slot busy, so that every request waits. Then:

1. **Fill.** ``held_requests`` opens N connections and sends one request on each (``seq`` in
   send order). Admission is timed from just before the connections open to the first answer
   of ``/health`` (the proxy port's) that counts N ``requests_buffered``, or stops at
   ``fill_cap``; the rate is requests admitted per second, and the most ever seen buffered
   says how many got in when not all did.
2. **Health.** Throughout, ``/health`` is asked every ``probe_interval`` over one kept-alive
   connection: its worst and median latency show whether the balancer still answers.
3. **Memory.** The balancer's RSS (with its traits worker) before the fill and once it ends.
4. **Drain.** The agents report every slot idle (a report with more idle slots wakes waiters);
   the fast upstream answers at once, and records each request's ``seq`` in arrival order. The
   drain runs until every request is answered or for ``drain_cap``; ``order_check`` compares
   the arrival order with the send order (with ``2 * buffer_slots`` serving at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.child_control import running_child
from bench.memory import tree_rss_bytes
from bench.order_check import OrderCheck, check_order
from bench.runner import say
from bench.scale_config import ScaleConfig
from bench.scale_measure import Meter, Usage, median
from bench.simulated_fleet import Upstream, running_fleet, running_upstream


@dataclass
class Probe:
    at: float
    """Seconds since the fill began, when the answer came."""
    latency: float
    buffered: int


@dataclass
class BufferCell:
    waiting: int
    admitted: int
    fill_seconds: float
    filled: bool
    drained: int
    drain_seconds: float
    failed: int
    statuses: dict[str, int]
    rss_before: int
    rss_full: int
    order: OrderCheck
    fill_usage: Usage
    listen_overflows: int
    """Connections the kernel dropped at a full listen queue during the fill (the client
    retries them after 1 s, 3 s, ...)."""
    probes: list[Probe] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def admission_rate(self) -> float:
        return self.admitted / self.fill_seconds if self.fill_seconds > 0 else float("nan")

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds > 0 else float("nan")

    @property
    def health_worst(self) -> float:
        return max((probe.latency for probe in self.probes), default=float("nan"))

    @property
    def health_p50(self) -> float:
        return median([probe.latency for probe in self.probes])


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets:
    on this machine, in practice, the balancer's, whose backlog is aiohttp's 128)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


@dataclass
class BufferResults:
    cells: list[BufferCell] = field(default_factory=list)


async def _probe(url: str, interval: float, began: float, probes: list[Probe]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        while True:
            sent = time.perf_counter()
            buffered = -1
            with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                async with session.get(url) as response:
                    buffered = int((await response.json())["requests_buffered"])
            done = time.perf_counter()
            probes.append(Probe(done - began, done - sent, buffered))
            await asyncio.sleep(max(0.0, interval - (done - sent)))


async def measure_buffers(config: ScaleConfig, workdir: Path) -> BufferResults:
    results = BufferResults()
    async with running_upstream(
        2, config.buffer_slots, workdir, "fast-upstream-buffer"
    ) as upstream:
        for waiting in config.buffer_sizes:
            results.cells.append(await _buffer_cell(config, workdir, upstream, waiting))
    return results


async def _buffer_cell(
    config: ScaleConfig, workdir: Path, upstream: Upstream, waiting: int
) -> BufferCell:
    flags = [
        f"--request-buffer-size={waiting}",
        "--request-buffer-timeout=30m",
        f"--max-client-connections={waiting + 512}",
        *config.paddler_flags,
    ]
    name = f"paddler-buffer-{waiting}"
    async with running_fleet(upstream, 2, workdir, flags, name=name, busy=True) as fleet:
        pid = fleet.paddler.balancer_pid
        await upstream.child.ask("reset")
        body = json.dumps({"prompt": "Say hi", "n_predict": 1})
        args = (fleet.paddler.proxy_url, "/completion", body, f"--count={waiting}")
        async with running_child(
            f"held-{name}", "bench.held_requests", *args, workdir=workdir
        ) as held:
            meter = Meter({"proxy": pid, "held": held.pid, "agents": fleet.agents.pid})
            rss_before = tree_rss_bytes(pid)
            probes: list[Probe] = []
            began = time.perf_counter()
            prober = asyncio.create_task(
                _probe(f"{fleet.paddler.proxy_url}/health", config.probe_interval, began, probes)
            )
            try:
                usage_from = meter.start()
                overflows = listen_overflows()
                await held.ask("start")
                filled = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.fill_cap):
                        while not filled:
                            await asyncio.sleep(config.probe_interval / 2)
                            filled = bool(probes) and probes[-1].buffered >= waiting
                fill_seconds = probes[-1].at if filled else time.perf_counter() - began
                fill_usage = meter.since(usage_from)
                overflows = listen_overflows() - overflows
                admitted = max((probe.buffered for probe in probes), default=0)
                rss_full = tree_rss_bytes(pid)
                say(
                    f"buffer {waiting}: {admitted} admitted in {fill_seconds:.1f} s; "
                    f"/health worst {max((p.latency for p in probes), default=0) * 1000:.0f} ms"
                )
                drain_began = time.perf_counter()
                await fleet.agents.ask("free")
                stats = await held.ask("stats")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.drain_cap):
                        while stats["done"] + stats["failed"] < waiting:
                            await asyncio.sleep(0.2)
                            stats = await held.ask("stats")
                drain_seconds = time.perf_counter() - drain_began
            finally:
                prober.cancel()
                await asyncio.wait([prober])
            arrivals_path = workdir / f"{name}-arrivals.json"
            await upstream.child.ask(f"arrivals {arrivals_path}")
            arrived = json.loads(arrivals_path.read_text())
    order = check_order(arrived, window=2 * config.buffer_slots)
    say(
        f"buffer {waiting}: {stats['done']} answered in {drain_seconds:.1f} s after the slots "
        f"freed; {order.inversions} inversions, max displacement {order.max_displacement}"
    )
    return BufferCell(
        waiting=waiting,
        admitted=admitted,
        fill_seconds=fill_seconds,
        filled=filled,
        drained=stats["done"],
        drain_seconds=drain_seconds,
        failed=stats["failed"],
        statuses=stats["statuses"],
        rss_before=rss_before,
        rss_full=rss_full,
        order=order,
        fill_usage=fill_usage,
        listen_overflows=overflows,
        probes=probes,
        examples=stats["examples"],
    )
