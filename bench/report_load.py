"""What a fleet's status reports cost the balancer: CPU per frame, with no request traffic.

``python -m bench.report_load [AGENTS] [SECONDS] [--profile PATH]`` runs a ``paddler balancer``
process and, in this process, ``AGENTS`` (1,000; at most 1,024, the balancer's ``max_agents``) simulated agents: one WebSocket each, which
registers as the real agent does, for an address this process answers as llama.cpp does
(``/health``, ``/props``; one listening port per agent, since the balancer keys agents by
address), then sends a status frame once a second, the agents spread evenly over the second.
The frames are those of an idle real agent (``protocol.encode`` of the same status), so that
nothing but the report path runs in the balancer.

Once every agent is verified and a few seconds have passed, it reads the balancer's CPU time
from ``/proc`` over ``SECONDS`` (20) and prints the share of a core and the microseconds per
frame. With ``--profile PATH``, ``py-spy`` samples the balancer meanwhile and writes its
collapsed stacks to ``PATH``; ``python -m bench.report_load split PATH`` then splits the samples
by part of the report path (aiohttp's WebSocket read, the protocol's parsing, the frame budget,
``agent_socket``'s loop, logging, the pool's ``report``). ``--server floor`` measures aiohttp
alone instead: a handler that reads the same frames and does nothing with them (with the
WebSocket heartbeat the balancer had, or without it: ``floor-no-heartbeat``). ``--silent``
measures a fleet that sends nothing once registered: the balancer's periodic work alone.

Measured on two cores shared with other work (medians of three runs of 20 s, 1,000 agents):

- before issue 10's report-path work: 122 µs a frame, 12.2% of a core;
- after: 75 µs a frame (7-8% of a core) on asyncio, 58 µs (5.8%) on uvloop; of that, 0.8% of
  a core is the fleet's periodic work, frames or not (``--silent``): the stats tick counting
  the totals (about 0.5%) and the pool's sweep (about 0.3%);
- aiohttp alone: 50-58 µs a frame on asyncio without a heartbeat, 64-70 with aiohttp's;
- then, with the frames read on the connection (``agent_connection``): 42 µs a frame (4.2% of
  a core) where the same run measured 73.5 (7.3%) before it; medians of three rounds, before
  and after taking turns (docs/benchmarks.md, ``report-path``).

What went: a fleet snapshot every second for the stats tick (17 µs a frame, see
``fleet_view``), aiohttp's per-socket heartbeat (16 µs, see ``agent_socket``), parsing a frame
identical to the one before it (and the pool's work on a new, cold status object: together
about 20 µs), and a third of the parse of a changed one (see ``protocol``); then aiohttp's
WebSocket read path (its reader, its message queue and a task woken per frame) and the pool's
index update for a report identical to the one it holds (9 µs in process; 1 µs now).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.paddler import RunningPaddler, running_balancer
from bench.processes import spawn, stop
from paddler import protocol
from paddler.protocol import LlamaCppState, Status

_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_SECONDS = 3.0
STATUS = Status(
    state=LlamaCppState.OK, slots_idle=3, slots_processing=1, models=("qwen2.5-0.5b-instruct",)
)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


@contextlib.asynccontextmanager
async def llamacpp_ports(count: int) -> AsyncIterator[list[int]]:
    """``count`` ports answering ``/health`` and ``/props`` as an idle llama.cpp of 4 slots."""

    async def describe(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "total_slots": 4})

    app = web.Application()
    app.router.add_get("/health", describe)
    app.router.add_get("/props", describe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for _ in range(count):
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield [int(address[1]) for address in runner.addresses]
    finally:
        await runner.cleanup()


class Agents:
    """Simulated agents: register, then one status frame a second each, evenly spread."""

    def __init__(
        self, session: aiohttp.ClientSession, management_url: str, *, silent: bool = False
    ) -> None:
        self._silent = silent
        self._session = session
        self._url = management_url + protocol.AGENT_SOCKET_PATH
        self.sent = 0

    async def run(self, ports: list[int], stop: asyncio.Event) -> None:
        """Each agent reports from the moment it registered: registering 1,000 takes longer
        than the balancer waits for a report (``--agent-stale-after``)."""
        start = asyncio.get_running_loop().time()
        async with asyncio.TaskGroup() as agents:
            for number, port in enumerate(ports):
                socket = await self._register(number, port)
                agents.create_task(self._report(socket, start + number / len(ports), stop))

    async def _register(self, number: int, port: int) -> aiohttp.ClientWebSocketResponse:
        socket = await self._session.ws_connect(self._url, heartbeat=None)
        register = protocol.Register(
            name=f"agent-{number}", host="127.0.0.1", port=port, status=STATUS
        )
        await socket.send_str(protocol.encode(register))
        reply = protocol.parse_balancer_message(await socket.receive_str())
        assert isinstance(reply, protocol.Registered), reply
        return socket

    async def _report(
        self, socket: aiohttp.ClientWebSocketResponse, at: float, stop: asyncio.Event
    ) -> None:
        """One frame a second, at ``at`` + whole seconds."""
        frame = protocol.encode(STATUS)
        loop = asyncio.get_running_loop()
        # Reading answers the balancer's heartbeat pings, as the real agent does.
        reading = asyncio.create_task(_drain(socket))
        try:
            if self._silent:
                await stop.wait()
            while not stop.is_set():
                at += 1.0
                await asyncio.sleep(max(0.0, at - loop.time()))
                await socket.send_str(frame)
                self.sent += 1
        finally:
            await socket.close()
            await reading


async def _drain(socket: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in socket:
        pass


async def verified(session: aiohttp.ClientSession, management_url: str, count: int) -> None:
    async with asyncio.timeout(120):
        while True:
            async with session.get(f"{management_url}/api/v1/agents") as response:
                agents = (await response.json())["agents"]
            if sum(agent["verified"] for agent in agents) >= count:
                return
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def floor_server(workdir: Path, heartbeat: bool) -> AsyncIterator[RunningPaddler]:
    """aiohttp alone: a WebSocket handler that answers ``register`` and reads every frame,
    doing nothing with it (``python -m bench.report_load floor-server``)."""
    process = await spawn(
        sys.executable,
        "-m",
        "bench.report_load",
        "floor-server",
        "heartbeat" if heartbeat else "no-heartbeat",
        log_path=workdir / "floor.log",
        stdout_pipe=True,
    )
    try:
        assert process.stdout is not None
        url = (await process.stdout.readline()).decode().strip()
        yield RunningPaddler(proxy_url="", management_url=url, balancer_pid=process.pid)
    finally:
        await stop(process)


async def serve_floor(heartbeat: bool) -> None:
    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=5.0 if heartbeat else None, timeout=2.0)
        await ws.prepare(request)
        await ws.receive()
        await ws.send_str(protocol.encode(protocol.Registered(agent_id="floor")))
        async for _ in ws:
            pass
        return ws

    async def agents(request: web.Request) -> web.Response:
        return web.json_response({"agents": [{"verified": True}] * 1024})

    app = web.Application()
    app.router.add_get(protocol.AGENT_SOCKET_PATH, socket)
    app.router.add_get("/api/v1/agents", agents)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


async def measure(
    count: int, seconds: float, profile: Path | None, silent: bool, server: str = "paddler"
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="report-load-"))
    connector = aiohttp.TCPConnector(limit=0)
    if server == "paddler":
        balancer = running_balancer(workdir, *(["--agent-stale-after=1h"] if silent else []))
    else:
        balancer = floor_server(workdir, heartbeat=server == "floor")
    async with (
        llamacpp_ports(count) as ports,
        balancer as paddler,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        agents = Agents(session, paddler.management_url, silent=silent)
        stop = asyncio.Event()
        sending = asyncio.create_task(agents.run(ports, stop))
        await verified(session, paddler.management_url, count)
        await asyncio.sleep(WARMUP_SECONDS)
        spy = None
        if profile is not None:
            spy = await asyncio.create_subprocess_exec(
                shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(paddler.balancer_pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "500",
                "--format",
                "raw",
                "--output",
                str(profile),
                "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        sent, cpu, own, wall = (
            agents.sent,
            cpu_seconds(paddler.balancer_pid),
            time.process_time(),
            time.perf_counter(),
        )
        await asyncio.sleep(seconds)
        frames = agents.sent - sent
        user, system = (
            after - before
            for after, before in zip(cpu_seconds(paddler.balancer_pid), cpu, strict=True)
        )
        used = user + system
        own = time.process_time() - own
        wall = time.perf_counter() - wall
        if spy is not None:
            await spy.wait()
        stop.set()
        await sending
    frames = max(frames, 1)
    print(
        f"{server}: {count} agents, {frames / wall:.0f} frames/s over {wall:.1f} s: balancer "
        f"{100 * used / wall:.1f}% of a core, {1e6 * used / frames:.1f} µs per frame "
        f"({1e6 * user / frames:.1f} user, {1e6 * system / frames:.1f} system) "
        f"(this process, the agents: {100 * own / wall:.1f}% of a core)"
    )
    shutil.rmtree(workdir, ignore_errors=True)


PARTS = (
    ("logging", ("logging/",)),
    ("pool.report", ("agent_controller_pool.py:report", "agent_controller.py")),
    ("protocol parse", ("protocol.py", "pydantic")),
    ("frame budget", ("frame_budget.py",)),
    ("websocket read", ("web_ws.py", "_websocket/", "streams.py")),
    ("agent_socket loop", ("agent_socket.py",)),
)
"""Each sample counts for the first part (in this order) that one of its frames names."""


def split(path: Path) -> None:
    """Print the share of the samples, and of those in ``agent_socket``, of each part."""
    parts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        part = next(
            (name for name, marks in PARTS if any(m in f for f in frames for m in marks)),
            "idle in the loop" if any("select" in f for f in frames[-2:]) else "other",
        )
        parts[part] += samples
    for name, samples in parts.most_common():
        print(f"{name:20s} {100 * samples / total:5.1f}%")


def main() -> None:
    if sys.argv[1:2] == ["split"]:
        split(Path(sys.argv[2]))
        return
    if sys.argv[1:2] == ["floor-server"]:
        asyncio.run(serve_floor(heartbeat=sys.argv[2] == "heartbeat"))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.report_load")
    parser.add_argument("agents", type=int, nargs="?", default=1000)
    parser.add_argument("seconds", type=float, nargs="?", default=20.0)
    parser.add_argument("--profile", type=Path, help="write py-spy's collapsed stacks here")
    parser.add_argument(
        "--silent",
        action="store_true",
        help="register, then send nothing (the balancer told to wait an hour for reports): "
        "what the fleet costs without its reports",
    )
    parser.add_argument(
        "--server",
        choices=("paddler", "floor", "floor-no-heartbeat"),
        default="paddler",
        help="floor: aiohttp alone, reading the same frames and doing nothing with them (with "
        "the balancer's WebSocket heartbeat, or without)",
    )
    arguments = parser.parse_args()
    asyncio.run(
        measure(
            arguments.agents,
            arguments.seconds,
            arguments.profile,
            arguments.silent,
            arguments.server,
        )
    )


if __name__ == "__main__":
    main()
