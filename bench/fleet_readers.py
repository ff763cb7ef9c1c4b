"""What reading the fleet costs the requests beside it: loop stalls while dashboards and scrapers read.

``python -m bench.fleet_readers [AGENTS] [SECONDS]`` runs a balancer in this process with
``AGENTS`` (1,000) agents joined straight into its pool (no sockets: the readers are measured
here, not the reports; see ``bench.report_load`` for those), StatsD on, and a probe task that
sleeps 1 ms again and again and records by how much each sleep overshot: the time the loop was
held by something else. A child process serves the one upstream with free slots and sends a
steady stream of small proxied requests (``POST /completion``, 100 a second), while it reads one
endpoint 5 times a second, phase after phase. For each phase it prints the loop's worst and p99
stall, the small requests' p50, p99 and worst latency, and the reader's own median latency.

``python -m bench.fleet_readers client`` is the child: it prints its upstream's port, then runs
one phase per line it reads (``PATH SECONDS``, ``-`` for no reader) and answers with one line of
JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from paddler.config import Address, BalancerConfig
from paddler.protocol import LlamaCppState, Status

READERS = ("-", "/metrics", "/api/v1/agents", "/api/v1/stats", "/api/v1/autoscaling", "dash")
"""``dash``: what one web dashboard tab polls (agents and stats), at 5 tabs' rate."""
REQUESTS_PER_SECOND = 100
READS_PER_SECOND = 5


# -- the child: upstream and clients -----------------------------------------------------------


async def client() -> None:
    async def completion(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"content": "ok", "stop": True})

    async def describe(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "total_slots": 64})

    app = web.Application()
    app.router.add_get("/health", describe)
    app.router.add_get("/props", describe)
    app.router.add_post("/completion", completion)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    proxy, management = sys.stdin.readline().split()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            reader, seconds = line.split()
            result = await phase(session, proxy, management, reader, float(seconds))
            print(json.dumps(result), flush=True)
    await runner.cleanup()


async def phase(
    session: aiohttp.ClientSession, proxy: str, management: str, reader: str, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    reads: list[float] = []

    async def small() -> None:
        started = time.perf_counter()
        async with session.post(f"{proxy}/completion", data=b'{"prompt":"hi"}') as response:
            await response.read()
            assert response.status == 200, response.status
        latencies.append(time.perf_counter() - started)

    async def read(path: str) -> None:
        started = time.perf_counter()
        async with session.get(f"{management}{path}", headers={"Accept-Encoding": "gzip"}) as r:
            await r.read()
        reads.append(time.perf_counter() - started)

    paths = ["/api/v1/agents", "/api/v1/stats"] if reader == "dash" else [reader]
    async with asyncio.TaskGroup() as tasks:
        start = time.perf_counter()
        sent = 0
        read_at = start
        while (now := time.perf_counter()) - start < seconds:
            while sent < (now - start) * REQUESTS_PER_SECOND:
                tasks.create_task(small())
                sent += 1
            if reader != "-" and now >= read_at:
                for path in paths:
                    tasks.create_task(read(path))
                read_at += 1 / READS_PER_SECOND
            await asyncio.sleep(0.002)
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "max_ms": latencies[-1] * 1e3,
        "read_ms": statistics.median(reads) * 1e3 if reads else 0.0,
    }


# -- the parent: balancer, fleet and probe -------------------------------------------------------


class CallbackTimer:
    """Times every callback the loop runs (pure-Python asyncio), in CPU time of this thread: the
    longest is the worst stall the loop's own work caused, whatever else the machine was doing
    meanwhile (on shared cores, wall time also counts the moments this process was not
    running at all)."""

    def __init__(self) -> None:
        self.worst = (0.0, "")
        self._run = asyncio.events.Handle._run

    def __enter__(self) -> CallbackTimer:
        timer, run = self, self._run

        def timed(handle: asyncio.events.Handle) -> None:
            what = _describe(handle)
            started = time.thread_time()
            run(handle)
            elapsed = time.thread_time() - started
            if elapsed > timer.worst[0]:
                timer.worst = (elapsed, what)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._run  # type: ignore[method-assign]

    def take(self) -> tuple[float, str]:
        worst, self.worst = self.worst, (0.0, "")
        return worst[0] * 1e3, worst[1]


def _describe(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        name = str(task.get_coro().__qualname__)  # type: ignore[union-attr]
        return "a request" if name == "RequestHandler._handle_request" else name
    # Never repr() a callback: that may run code of the object it is bound to.
    return str(getattr(callback, "__qualname__", type(callback).__name__))


class SliceTimer:
    """The longest slice of work the fleet view let a reader do without yielding (CPU time)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self) -> SliceTimer:
        try:
            from paddler.balancer.fleet import fleet_view
        except ImportError:  # before the fleet view: each reader ran in one piece
            self._module = None
            return self
        self._module, self._sliced, timer = fleet_view, fleet_view.sliced, self
        original = fleet_view.sliced

        async def timed(items: Any, charge: Any = None) -> Any:
            async for chunk in original(items, charge):
                started = time.thread_time()
                yield chunk
                timer.times.append(time.thread_time() - started)

        fleet_view.sliced = timed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._module is not None:
            self._module.sliced = self._sliced  # type: ignore[attr-defined]

    def take(self) -> str:
        times, self.times = sorted(self.times), []
        if not times:
            return "-"
        return f"{times[-1] * 1e3:4.2f} (p99 {times[int(len(times) * 0.99)] * 1e3:4.2f}) ms"


class GcPauses:
    """The longest collection of Python's cycle collector: it stops the loop too."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.worst = max(self.worst, time.perf_counter() - self._started)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst * 1e3


class LagProbe:
    """Sleeps 1 ms over and over; each overshoot is time the loop spent elsewhere."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - started - 0.001)

    def take(self) -> tuple[float, float]:
        lags, self.lags = sorted(self.lags), []
        return lags[-1] * 1e3, lags[int(len(lags) * 0.99)] * 1e3


def join_fleet(pool: Any, agents: int, upstream_port: int) -> None:
    """One agent with free slots (the child's upstream); the others full, so no request goes
    to an address nothing listens on, but every one of them is listed and has its gauges."""
    model = ("qwen2.5-0.5b-instruct",)
    free = Status(state=LlamaCppState.OK, slots_idle=64, models=model)
    full = Status(state=LlamaCppState.OK, slots_idle=0, slots_processing=4, models=model)
    for number in range(agents):
        if number == 0:
            address, status = Address("http", "127.0.0.1", upstream_port), free
        else:
            address = Address(
                "http", f"10.{number // 62500}.{number // 250 % 250}.{number % 250 + 1}", 8080
            )
            status = full
        agent, session = pool.register(f"agent-{number}", address, status)
        pool.verified(agent, 64 if number == 0 else 4, "/props total_slots=4", session=session)
        agent.prefill_rate, agent.slot_hold = 1234.5, 2.5


async def measure(agents: int, seconds: float) -> None:
    from paddler.balancer.service import Balancer

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fleet_readers",
        "client",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    upstream_port = int(await child.stdout.readline())
    config = replace(
        BalancerConfig(management_port=0, reverseproxy_port=0),
        agent_stale_after=3600.0,
        statsd_enable=True,
        max_agents=max(1024, agents),
        request_buffer_size=1000,
    )
    balancer = Balancer(config)
    join_fleet(balancer.pool, agents, upstream_port)
    shutdown, stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(balancer.run(shutdown))
    await balancer.ready.wait()
    probe = LagProbe()
    probing = asyncio.create_task(probe.run(stop))
    proxy = f"http://127.0.0.1:{balancer.reverseproxy_port}"
    management = f"http://127.0.0.1:{balancer.management_port}"
    child.stdin.write(f"{proxy} {management}\n".encode())
    print(f"{agents} agents, {REQUESTS_PER_SECOND} small requests/s, reads {READS_PER_SECOND}/s")
    with CallbackTimer() as timer, GcPauses() as pauses, SliceTimer() as slices:
        for reader in READERS:
            if probe.lags:
                probe.take()
            timer.take()
            child.stdin.write(f"{reader} {seconds}\n".encode())
            result = json.loads(await child.stdout.readline())
            worst, p99 = probe.take()
            longest, what = timer.take()
            print(
                f"{reader:20s} longest callback {longest:6.2f} ms ({what}) | slice "
                f"{slices.take()} | gc "
                f"{pauses.take():5.2f} ms | loop lag worst "
                f"{worst:6.2f} p99 {p99:5.2f} ms | requests p50 {result['p50_ms']:5.2f} p99 "
                f"{result['p99_ms']:6.2f} worst {result['max_ms']:6.2f} ms | read "
                f"{result['read_ms']:6.2f} ms",
                flush=True,
            )
    child.stdin.close()
    await child.wait()
    stop.set()
    await probing
    shutdown.set()
    await running


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        asyncio.run(client())
    else:
        asyncio.run(
            measure(
                int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
                float(sys.argv[2]) if len(sys.argv) > 2 else 5.0,
            )
        )
