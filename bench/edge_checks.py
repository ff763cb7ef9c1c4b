"""The measurements of ``bench.edge``, one coroutine per defect of issue 9, each returning what
it saw. They talk to real ``paddler balancer`` processes over their ports only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.client_connections import silent_lifetime
from bench.cpu import process_seconds
from bench.large_bodies import registered
from bench.paddler import running_balancer
from bench.soak import rss_mib
from bench.soak_cluster import SoakCluster
from bench.soak_load import Tally, chat_client, slowloris
from bench.status_flood import health_during_flood
from paddler import protocol
from paddler.protocol import LlamaCppState, Register, Status
from tests.support.prometheus import sample

LONG_STREAM = {"prompt": "once upon a time", "max_tokens": 3000, "stream": True, "ignore_eos": True}
"""Still running when its server is frozen: the slow model makes about 1,500 tokens/s."""


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@dataclass(eq=False)
class _Stream:
    agent: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    error_at: float | None = None


async def _run_stream(session: aiohttp.ClientSession, proxy: str, stream: _Stream) -> None:
    async with session.post(f"{proxy}/v1/completions", json=LONG_STREAM) as response:
        stream.agent = response.headers.get("X-Paddler-Agent", "")
        async for line in response.content:
            if line.startswith(b"data: {"):
                stream.started.set()
                if b'"error"' in line and "error" in json.loads(line[6:]):
                    stream.error_at = time.monotonic()


@dataclass
class Frozen:
    error_seconds: list[float] = field(default_factory=list)
    """Seconds from SIGSTOP to each of the two clients' SSE error event (None: never)."""
    clients: int = 0
    meanwhile: str = ""
    """Who served a request sent once the streams had ended, and its status."""
    served_elsewhere: bool = False
    usable_again_seconds: float | None = None
    thawed_served: int = 0
    """Of 4 concurrent streams after SIGCONT, how many the thawed server took."""


async def frozen_backend(
    session: aiohttp.ClientSession, cluster: SoakCluster, *, with_agent: bool = False
) -> Frozen:
    """Two streams on one server, SIGSTOP of its llama.cpp (``with_agent``: and of its agent, a
    frozen host), and SIGCONT (always)."""
    found = Frozen()
    proxy = cluster.proxy
    running = {
        s: asyncio.create_task(_run_stream(session, proxy, s))
        for s in [_Stream() for _ in range(4)]
    }
    async with asyncio.timeout(30):
        await asyncio.gather(*(s.started.wait() for s in running))
    names = sorted(cluster.agents)
    # Two streams each, normally; the server with the most is frozen, whatever happened.
    name = max(names, key=lambda n: sum(s.agent == n for s in running))
    other = next(n for n in names if n != name)
    victims = [s for s in running if s.agent == name]
    for stream, task in running.items():
        if stream not in victims:
            task.cancel()
    pid = cluster.llamacpp_pid(name)
    assert pid is not None
    pids = [pid, cluster.agents[name].pid] if with_agent else [pid]
    for each in pids:
        os.kill(each, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(90):
                await asyncio.gather(*(running[s] for s in victims), return_exceptions=True)
        found.clients = len(victims)
        found.error_seconds = [s.error_at - frozen_at for s in victims if s.error_at is not None]
        body = {"prompt": "hi", "max_tokens": 4}
        async with session.post(f"{proxy}/v1/completions", json=body) as response:
            await response.read()
            served_by = response.headers.get("X-Paddler-Agent", "nobody")
            found.meanwhile = f"{response.status} from {served_by}"
            found.served_elsewhere = response.status == 200 and served_by == other
    finally:
        for each in pids:
            os.kill(each, signal.SIGCONT)
        thawed_at = time.monotonic()
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
    async with asyncio.timeout(60):
        while True:
            agents = (await cluster.agents_json(session))["agents"]
            # A frozen host's agent was removed: it is listed again once it re-registered.
            agent = next((a for a in agents if a["name"] == name), None)
            if (
                agent is not None
                and agent["state"] == "ok"
                and not agent["circuit_open"]
                and agent["slots_idle"] == 2
            ):
                break
            await asyncio.sleep(0.1)
    found.usable_again_seconds = time.monotonic() - thawed_at
    again = {
        s: asyncio.create_task(_run_stream(session, proxy, s))
        for s in [_Stream() for _ in range(4)]
    }
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.started.wait() for s in again))
        found.thawed_served = sum(s.agent == name for s in again)
    finally:
        for task in again.values():
            task.cancel()
        await asyncio.gather(*again.values(), return_exceptions=True)
    return found


@dataclass
class Slowloris:
    connections: int
    opened: int = 0
    still_open: int = 0
    closed_within: float = 0.0
    """The latest, in seconds after opening, at which the balancer closed one of them."""
    silent_lifetime: float | None = None
    served: int = 0
    errors: int = 0
    p99: float = 0.0


async def slowloris_under_load(
    session: aiohttp.ClientSession, proxy: str, connections: int, after: float, silent_max: float
) -> Slowloris:
    """``connections`` trickling heads for ``after`` seconds, one silent connection, and two
    closed-loop chat clients meanwhile."""
    host, port = host_port(proxy)
    tally, load = Tally(), Tally()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        trickling = group.create_task(slowloris(host, port, connections, tally, stop))
        silent = group.create_task(silent_lifetime(host, port, silent_max))
        clients = [
            group.create_task(chat_client(session, proxy, load, 30.0, stop)) for _ in range(2)
        ]
        await asyncio.sleep(after)
        found = Slowloris(connections, opened=tally.slowloris_opened)
        found.still_open = tally.slowloris_opened - len(tally.slowloris_closed)
        found.closed_within = max(tally.slowloris_closed, default=0.0)
        stop.set()
        await asyncio.gather(trickling, *clients)
        found.silent_lifetime = await silent
    found.served = sum(load.served.values())
    found.errors = sum(load.errors.values()) + load.hung
    latencies = sorted(load.latencies)
    found.p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    return found


@dataclass
class Cap:
    cap: int
    connections: int
    got_503: int = 0
    rss_before: float = 0.0
    rss_after: float = 0.0


async def connection_cap(workdir: Path, cap: int, connections: int) -> Cap:
    """``connections`` silent connections to a balancer capped at ``cap``: who got 503."""
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    found = Cap(cap, connections)
    async with running_balancer(workdir, f"--max-client-connections={cap}") as paddler:
        host, port = host_port(paddler.proxy_url)
        found.rss_before = rss_mib(paddler.balancer_pid)
        opened = [await asyncio.open_connection(host, port) for _ in range(connections)]

        async def answer(reader: asyncio.StreamReader) -> bytes:
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(3.0):
                    return await reader.read(64)
            return b""

        answers = await asyncio.gather(*(answer(reader) for reader, _ in opened))
        found.got_503 = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        found.rss_after = rss_mib(paddler.balancer_pid)
        for _, writer in opened:
            writer.close()
    return found


@dataclass(frozen=True)
class Capacity:
    health_idle: int
    advice_servers: int
    advice_slots: int
    suggested_change: int
    metrics_slots: float | None


async def capacity(session: aiohttp.ClientSession, cluster: SoakCluster) -> Capacity:
    """What ``/health``, the autoscaling advice and ``/metrics`` count as the fleet's capacity."""
    async with session.get(f"{cluster.proxy}/health") as response:
        health = await response.json()
    async with session.get(f"{cluster.management}/api/v1/autoscaling") as response:
        advice = await response.json()
    async with session.get(f"{cluster.management}/metrics") as response:
        metrics = sample(await response.text(), "paddler_slots")
    return Capacity(
        health["slots_idle"],
        advice["servers"],
        advice["slots_total"],
        advice["suggested_change"],
        metrics,
    )


async def settled(session: aiohttp.ClientSession, cluster: SoakCluster, idle: int) -> None:
    """Until the fleet reports ``idle`` idle slots and none processing (polled)."""
    async with asyncio.timeout(30):
        while True:
            fleet = await cluster.agents_json(session)
            if fleet["slots_idle"] == idle and fleet["slots_processing"] == 0:
                return
            await asyncio.sleep(0.1)


@dataclass
class Rogue:
    before: Capacity
    after: Capacity
    verification: str = ""
    refused: dict[str, bool] = field(default_factory=dict)


async def rogue_registration(session: aiohttp.ClientSession, cluster: SoakCluster) -> Rogue:
    """A claim of 60,000 idle slots at 127.0.0.1:1, and three malformed registrations."""
    before = await capacity(session, cluster)
    socket = await session.ws_connect(cluster.management + protocol.AGENT_SOCKET_PATH)
    claim = Status(state=LlamaCppState.OK, slots_idle=60_000)
    await socket.send_str(
        protocol.encode(Register(name="rogue", host="127.0.0.1", port=1, status=claim))
    )
    await socket.receive_str()
    verification = ""
    async with asyncio.timeout(20):
        while "cannot reach" not in verification:
            await socket.send_str(protocol.encode(claim))
            agents = (await cluster.agents_json(session))["agents"]
            verification = next(a for a in agents if a["name"] == "rogue")["verification"] or ""
            await asyncio.sleep(0.2)
    found = Rogue(before, await capacity(session, cluster), verification)
    await socket.close()
    forged = "gpu\n2026-12-01 00:00:00,000 WARNING paddler: FORGED\x1b[2J"
    for label, name, host in (
        ("host with ':'", "colon", "127.0.0.1:80"),
        ("host with NUL", "nul", "127.0.0.1\x00evil"),
        ("name with \\n and ESC", forged, "127.0.0.1"),
    ):
        found.refused[label] = await _refused(session, cluster.management, name, host)
    return found


async def _refused(session: aiohttp.ClientSession, management: str, name: str, host: str) -> bool:
    register = {
        "v": 1,
        "type": "register",
        "name": name,
        "host": host,
        "port": 1,
        "status": {"type": "status", "state": "ok", "slots_idle": 1},
    }
    async with session.ws_connect(management + protocol.AGENT_SOCKET_PATH) as socket:
        await socket.send_str(json.dumps(register))
        reply = await socket.receive()
        if reply.type is not aiohttp.WSMsgType.TEXT:
            return True
        return isinstance(protocol.parse_balancer_message(reply.data), protocol.Error)


@dataclass
class FloodRound:
    longest: float
    p99: float
    median: float
    requests: int
    ending: str
    seconds: float
    balancer_cpu: float


async def status_flood(cluster: SoakCluster, llamacpp_port: int, frames: int) -> FloodRound:
    """One socket sends ``frames`` status frames to the cluster's balancer; ``/health`` meanwhile."""
    cpu = process_seconds(cluster.balancer_pid)
    started = time.monotonic()
    latencies, ending = await health_during_flood(cluster.management, llamacpp_port, frames)
    return FloodRound(
        longest=latencies[-1],
        p99=latencies[int(len(latencies) * 0.99)],
        median=statistics.median(latencies),
        requests=len(latencies),
        ending=ending,
        seconds=time.monotonic() - started,
        balancer_cpu=process_seconds(cluster.balancer_pid) - cpu,
    )


@dataclass
class Keys:
    no_key: str = ""
    wrong_bearer: str = ""
    wrong_x_api_key: str = ""
    right_key: int = 0
    openai_shape: bool = False
    health: int = 0
    key_in_log: int = 0


async def client_keys(session: aiohttp.ClientSession, workdir: Path, llamacpp_port: int) -> Keys:
    """A balancer with ``--api-key``, and an agent for a real llama.cpp of the cluster."""
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    key, wrong = "edge-secret-" + os.urandom(6).hex(), "edge-wrong-" + os.urandom(6).hex()
    found = Keys()
    async with (
        running_balancer(workdir, f"--api-key={key}") as paddler,
        registered(session, paddler.management_url, "keyed", llamacpp_port, "edge"),
    ):
        url = f"{paddler.proxy_url}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        shapes = []
        for attribute, headers in (
            ("no_key", {}),
            ("wrong_bearer", {"Authorization": f"Bearer {wrong}"}),
            ("wrong_x_api_key", {"X-Api-Key": wrong}),
        ):
            async with session.post(url, json=body, headers=headers) as response:
                error = (await response.json()).get("error", {})
                setattr(found, attribute, f"{response.status} {error.get('type')}")
                shapes.append(response.status == 401 and {"message", "type", "code"} <= set(error))
        found.openai_shape = all(shapes)
        async with session.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            await response.read()
            found.right_key = response.status
        async with session.get(f"{paddler.proxy_url}/health") as response:
            found.health = response.status
    log = (workdir / "balancer.log").read_text(errors="replace")
    found.key_in_log = log.count(key) + log.count(wrong)
    return found
