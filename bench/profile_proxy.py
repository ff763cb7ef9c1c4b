"""One proxy hop, measured from outside: CPU per small request and per relayed chunk, memory per
open stream, where the balancer's CPU goes, and its instructions per request.

Usage (inside the venv; needs ``wrk`` and ``nginx`` from Debian, ``py-spy`` for ``--profile``,
``valgrind`` for ``instructions``, ``strace`` for ``syscalls``)::

    python -m bench.profile_proxy [--contestants direct,nginx,paddler] [--rounds 3]
        [--what small,latency,chunks,memory,memory-long] [--seconds 6] [--streams 1000]
        [--profile DIR] [--prototype NAME='python proto.py' ...] [-- balancer flags]
    python -m bench.profile_proxy instructions [--contestants paddler,paddler@TREE]
        [--what small,chunks] [--requests 400] [--prototype NAME=COMMAND ...]
    python -m bench.profile_proxy syscalls [--contestants paddler,nginx] [--seconds 6]

Every contestant proxies to the same fast fake llama.cpp (``_FakeLlamaCpp``: a raw
``asyncio.Protocol`` on uvloop that answers a small JSON body on a kept-alive connection, or a
chunked SSE stream paced by ``?chunks=N&interval=MS`` that ends with llama.cpp's closing of the
connection), so that what is measured is the hop, not the server. Contestants:

- ``direct``: no hop, the fake itself;
- ``nginx``: ``bench.nginx``, one worker;
- ``paddler``: a ``paddler balancer`` process with its defaults (a log line per request at
  INFO, to a file), the flags after ``--``, and one agent with 4096 slots registered over the
  socket; ``paddler-asyncio`` adds ``--event-loop asyncio``, ``paddler-quiet``
  ``--log-level warning``, ``paddler-aiohttp`` ``--upstream-client aiohttp``, ``paddler-aiohttp-server``
  ``--proxy-server aiohttp`` and ``paddler-httptools-server`` ``--proxy-server httptools``; ``paddler@TREE`` (or ``paddler-asyncio@TREE``, ...) runs the sources
  of another checkout, to compare two builds in one run;
- any ``--prototype NAME=COMMAND``: a program started as ``COMMAND PORT UPSTREAM_PORT``, named
  NAME in ``--contestants``.

What is measured, each round, contestant after contestant:

- ``small``: ``wrk -t1 -c16`` POSTs a small JSON body to ``/completion`` for ``--seconds``; the
  contestant's CPU (``/proc``, its process and children) divided by the requests served, the
  requests per second and wrk's p99.
- ``latency``: ``wrk -c1``'s p50 of the same request, one connection.
- ``chunks``: 32 clients each stream 10 requests of 10 chunks, then 4 of 100 chunks, a chunk
  every 5 ms; CPU per chunk is the difference per request divided by the 90 extra chunks, so
  that what each request costs anyway cancels out.
- ``memory``: ``--streams`` slow streams (one chunk a second) held open at once; the growth of
  the contestant's resident memory divided by their number; ``memory-long``: the same with at
  most 250 streams that sent 200 events (19 KiB) first, at 50 a second, as a long generation
  has. Each in a contestant process of its own.

CPU seconds on a shared 2-core machine move by 10-30% between rounds with what else runs.
``instructions`` counts the contestant's user-space instructions under callgrind instead: the
count moves by 0.2%, so that a 2% cut shows (system calls are not in it: ``syscalls`` counts them
with ``strace -c -f`` per small request).
``--profile DIR`` runs small requests and paced streams once more under ``py-spy record
--native`` and prints the functions with the most samples; the raw stacks stay in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.cpu import process_seconds
from bench.llamacpp import Backend
from bench.nginx import running_nginx
from bench.processes import child_env, free_port, running_hop, spawn, stop, wait_for_port
from paddler import protocol

SMALL_BODY = '{"prompt":"hello","n_predict":1}'
STREAM_BODY = b'{"messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":100}'


# -- the fake llama.cpp --------------------------------------------------------------------------

_SMALL = b'{"content":"hi","stop":true,"timings":{"cache_n":0,"prompt_n":2,"prompt_ms":1.0}}'
_PROPS = json.dumps({"total_slots": 4096, "model_alias": "fake", "model_path": "fake.gguf"})
_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}],"object":"chat.completion.chunk"}\n\n'
_LAST = (
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
    b'"timings":{"cache_n":0,"prompt_n":2,"prompt_ms":1.0}}\n\ndata: [DONE]\n\n'
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Server: llama.cpp\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
)


def _answer(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Keep-Alive: timeout=5, max=100000\r\nServer: llama.cpp\r\n\r\n%s" % (len(body), body)
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _FakeLlamaCpp(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end].lower()
            match = re.search(rb"content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            method, target = head.split(b" ", 2)[:2]
            self._answer(method, target, body)

    def _answer(self, method: bytes, target: bytes, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if method == b"get" and target.startswith(b"/props"):
            transport.write(_answer(_PROPS.encode()))
        elif method == b"get" and target.startswith(b"/health"):
            transport.write(_answer(b'{"status":"ok"}'))
        elif b'"stream":true' in body.replace(b" ", b""):
            query = dict(
                part.split(b"=", 1) for part in target.partition(b"?")[2].split(b"&") if part
            )
            self._stream(
                int(query.get(b"chunks", 10)),
                float(query.get(b"interval", 0)) / 1000,
                int(query.get(b"first", 0)),
                float(query.get(b"first_interval", 0)) / 1000,
            )
        else:
            transport.write(_answer(_SMALL))

    def _stream(
        self, chunks: int, interval: float, first: int = 0, first_interval: float = 0.0
    ) -> None:
        """``chunks`` events, one every ``interval``; the ``first`` of them one every
        ``first_interval``."""
        transport = self._transport
        assert transport is not None
        transport.write(_SSE_HEAD)
        if not interval:
            transport.write(_chunk(_EVENT) * chunks + _chunk(_LAST) + b"0\r\n\r\n")
            transport.close()
            return
        loop = asyncio.get_running_loop()

        def step(sent: int) -> None:
            if transport.is_closing():
                return
            if sent == chunks:
                transport.write(_chunk(_LAST) + b"0\r\n\r\n")
                transport.close()  # as llama.cpp does after a stream
                return
            transport.write(_chunk(_EVENT))
            loop.call_later(first_interval if sent < first else interval, step, sent + 1)

        step(0)


async def serve_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        _FakeLlamaCpp, "127.0.0.1", port, backlog=4096
    )
    print("fake llama.cpp ready", flush=True)
    await server.serve_forever()


# -- contestants ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def fake_upstream(workdir: Path) -> AsyncIterator[Hop]:
    port = free_port()
    process = await spawn(
        sys.executable, "-m", "bench.profile_proxy", "upstream", str(port),
        log_path=workdir / "upstream.log",
    )  # fmt: skip
    try:
        await wait_for_port(port)
        yield Hop(f"http://127.0.0.1:{port}", process.pid)
    finally:
        await stop(process)


_PADDLERS = {
    "paddler": [],
    "paddler-asyncio": ["--event-loop=asyncio"],
    "paddler-quiet": ["--log-level=warning"],
    "paddler-aiohttp": ["--upstream-client=aiohttp"],
    "paddler-aiohttp-server": ["--proxy-server=aiohttp"],
    "paddler-httptools-server": ["--proxy-server=httptools"],
}
"""Paddler contestants, and the flags each adds (a line per request is logged at INFO)."""


@contextlib.asynccontextmanager
async def contestant(
    name: str, upstream: Hop, workdir: Path, flags: Sequence[str], prototypes: dict[str, str]
) -> AsyncIterator[Hop]:
    if name == "direct":
        yield upstream
    elif name == "nginx":
        backend = Backend("fake", upstream.url, upstream.pid)
        async with running_nginx([backend], workdir) as nginx:
            yield Hop(nginx.url, nginx.pid)
    elif name.partition("@")[0] in _PADDLERS:
        kind, _, tree = name.partition("@")
        extra = _PADDLERS[kind]
        async with (
            _balancer(
                workdir, tree, "--routing=slots", "--agent-stale-after=1h", *extra, *flags
            ) as paddler,
            _registered(paddler, upstream),
        ):  # fmt: skip
            yield Hop(paddler.proxy_url, paddler.pid)
    elif name in prototypes:
        upstream_port = int(upstream.url.rsplit(":", 1)[1])
        command = shlex.split(prototypes[name])
        async with running_hop(command, upstream_port, workdir / "prototype.log") as (url, pid):
            yield Hop(url, pid)
    else:
        raise SystemExit(f"unknown contestant {name!r}")


@dataclass(frozen=True)
class _Balancer:
    proxy_url: str
    management_url: str
    pid: int


@contextlib.asynccontextmanager
async def _balancer(
    workdir: Path, tree: str, *flags: str, prefix: Sequence[str] = ()
) -> AsyncIterator[_Balancer]:
    """``paddler balancer`` on free ports (from the sources in ``tree``, if given; run by
    ``prefix``, valgrind for one), its log in a file as a service manager would keep it. Its
    ports are read from ``/proc``, so that any ``--log-level`` works."""
    env = child_env()
    if tree:
        env["PYTHONPATH"] = f"{tree}/src"
    with (workdir / "balancer.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "paddler", "balancer",
            "--management-port=0", "--reverseproxy-port=0", *flags,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip
    try:
        async with asyncio.timeout(300 if prefix else 30):
            while len(ports := _listening_ports(process.pid)) < 2:
                if process.returncode is not None:
                    raise RuntimeError(f"the balancer exited with code {process.returncode}")
                await asyncio.sleep(0.05)
        # The management port is opened first, on the lower descriptor.
        management, proxy = ports[:2]
        yield _Balancer(f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{management}", process.pid)
    finally:
        await stop(process, timeout=10.0)


def _listening_ports(pid: int) -> list[int]:
    """The TCP ports ``pid`` listens on, in the order of their descriptors."""
    descriptors: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                descriptors[target[8:-1]] = int(fd)
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in descriptors:  # 0A: LISTEN
            found.append((descriptors[fields[9]], int(fields[1].rsplit(":", 1)[1], 16)))
    return [port for _, port in sorted(found)]


@contextlib.asynccontextmanager
async def _registered(paddler: _Balancer, upstream: Hop) -> AsyncIterator[None]:
    """One agent with 4096 slots at the fake, registered over the agents' socket."""
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(paddler.management_url + protocol.AGENT_SOCKET_PATH)
        port = int(upstream.url.rsplit(":", 1)[1])
        status = protocol.Status(state=protocol.LlamaCppState.OK, slots_idle=4096)
        register = protocol.Register(name="fake", host="127.0.0.1", port=port, status=status)
        await socket.send_str(protocol.encode(register))
        await socket.receive_str()
        reading = asyncio.create_task(_read_all(socket))  # answers the heartbeat's pings
        try:
            async with asyncio.timeout(30):
                while True:
                    async with session.get(paddler.proxy_url + "/health") as response:
                        if response.status == 200 and (await response.json())["slots_idle"] > 1000:
                            break
                    await asyncio.sleep(0.05)
            yield
        finally:
            reading.cancel()
            await socket.close()


async def _read_all(socket: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in socket:
        pass


# -- measurements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    served: int
    p50_ms: float
    p99_ms: float


async def wrk(url: str, connections: int, seconds: int, workdir: Path) -> WrkRun:
    """Requests served and latency percentiles, for small POSTs to ``url``."""
    script = workdir / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{SMALL_BODY}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    process = await asyncio.create_subprocess_exec(
        "wrk", "--latency", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output = (await process.communicate())[0].decode()
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    served = re.search(r"(\d+) requests in", output)
    if served is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    return WrkRun(int(served.group(1)), _percentile(output, 50), _percentile(output, 99))


def _percentile(output: str, percent: int) -> float:
    found = re.search(rf"\b{percent}%\s+([\d.]+)(us|ms|s)\b", output)
    if found is None:
        raise RuntimeError(f"no {percent}% in wrk's output:\n{output}")
    return float(found.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[found.group(2)]


async def small_requests(hop: Hop, seconds: int, workdir: Path) -> tuple[float, WrkRun]:
    """CPU ms per small request, and wrk's run."""
    before = process_seconds(hop.pid)
    run = await wrk(hop.url + "/completion", 16, seconds, workdir)
    return (process_seconds(hop.pid) - before) / run.served * 1000, run


async def _stream_requests(hop: Hop, path: str, count: int) -> None:
    """``count`` streamed requests in turn, each on a new connection (llama.cpp, and so the
    ``direct`` contestant, closes it after a stream), each read to its end."""
    host, port = hop.url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(STREAM_BODY)}\r\n\r\n"
    )
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head.encode() + STREAM_BODY)
            status = await reader.readuntil(b"\r\n\r\n")
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"answered {status[:40]!r}")
            await reader.readuntil(b"\r\n0\r\n\r\n")
        finally:
            writer.close()


async def _cpu_per_stream(hop: Hop, chunks: int, requests: int, streams: int = 32) -> float:
    path = f"/v1/chat/completions?chunks={chunks}&interval=5"
    before = process_seconds(hop.pid)
    await asyncio.gather(*(_stream_requests(hop, path, requests) for _ in range(streams)))
    return (process_seconds(hop.pid) - before) / (streams * requests)


async def chunk_cost(hop: Hop) -> float:
    """CPU µs per relayed chunk."""
    short = await _cpu_per_stream(hop, 10, 10)
    long = await _cpu_per_stream(hop, 100, 4)
    return (long - short) / 90 * 1e6


def resident_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (nginx's master and worker)."""
    members = [pid]
    with contextlib.suppress(OSError):
        members += [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    total = 0
    for member in members:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def memory_per_stream(hop: Hop, streams: int, first: int = 0) -> float:
    """KiB of resident memory per open slow stream (a chunk a second, after ``first`` chunks at
    50 a second: 200 make a stream that has sent 19 KiB, as a long generation has)."""
    host, port = hop.url.removeprefix("http://").rsplit(":", 1)
    query = f"chunks=600&interval=1000&first={first}&first_interval=20"
    request = (
        f"POST /v1/chat/completions?{query} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\n\n")  # the first event
        opened.append((reader, writer))

    async def drain(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass

    try:
        await asyncio.gather(*(open_one() for _ in range(20)))  # one-off allocations first
        for _, writer in opened:
            writer.close()
        opened.clear()
        await asyncio.sleep(1.5)
        before = resident_kib(hop.pid)
        for start in range(0, streams, 100):
            await asyncio.gather(*(open_one() for _ in range(min(100, streams - start))))
        drains = [asyncio.create_task(drain(reader)) for reader, _ in opened]
        await asyncio.sleep(3.0 + first / 50)  # a few chunks on every stream, after the first
        grown = resident_kib(hop.pid) - before
        for task in drains:
            task.cancel()
        return grown / streams
    finally:
        for _, writer in opened:
            writer.close()
        await asyncio.sleep(1.0)


async def profile(hop: Hop, seconds: int, workdir: Path, directory: Path, name: str) -> None:
    """Small requests, then paced streams, each under ``py-spy record``; prints the functions
    with the most samples of each."""
    for workload in ("small", "chunks"):
        raw = directory / f"{name}-{workload}.txt"
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(hop.pid),
            "--native", "--rate", "200", "--format", "raw", "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(1.0)
        if workload == "small":
            await wrk(hop.url + "/completion", 16, seconds, workdir)
        else:
            path = "/v1/chat/completions?chunks=100&interval=5"
            await asyncio.gather(*(_stream_requests(hop, path, 8) for _ in range(32)))
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        await spy.wait()
        print(f"== {name}, {workload}")
        print(top_of_profile(raw))


def top_of_profile(raw: Path, rows: int = 25) -> str:
    """Sample shares from py-spy's raw (collapsed) stacks: per function, its own and with its
    callees; per file, its own."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_frame(frame) for frame in stack.split(";")]
        weight = int(count)
        samples += weight
        own[frames[-1]] += weight
        files[frames[-1].rpartition(" ")[2]] += weight
        for frame in set(frames):
            total[frame] += weight
    lines = [f"{samples} samples. own% total% function (file)"]
    lines += [
        f"{weight / samples:6.1%} {total[frame] / samples:6.1%} {frame}"
        for frame, weight in own.most_common(rows)
    ]
    lines.append("-- the most inclusive, below the event loop's own frames")
    inclusive = [(frame, weight) for frame, weight in total.most_common() if weight < samples * 0.9]
    lines += [
        f"{own[frame] / samples:6.1%} {weight / samples:6.1%} {frame}"
        for frame, weight in inclusive[:rows]
    ]
    lines.append("-- own samples per file")
    lines += [f"{weight / samples:6.1%} {name}" for name, weight in files.most_common(rows)]
    return "\n".join(lines)


def _frame(frame: str) -> str:
    """``function (file.py:123)`` as ``function (file.py)``: samples summed per function."""
    name, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path.rsplit('/', 1)[-1]})"


async def measure(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    what = set(args.what.split(","))
    results: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="paddler-profile-") as temporary:
        workdir = Path(temporary)
        async with fake_upstream(workdir) as upstream:
            for round_number in range(args.rounds):
                for name in args.contestants.split(","):
                    result = await _measure_one(name, round_number, upstream, workdir, what, args)
                    print(json.dumps(result), flush=True)
                    results[name].append(result)
    if args.rounds > 1:
        for name, rounds in results.items():
            summary = {
                key: f"median {statistics.median(values):g}, min {min(values):g}"
                for key in rounds[0]
                if key not in ("contestant", "round")
                for values in [[float(one[key]) for one in rounds]]  # type: ignore[arg-type]
            }
            print(json.dumps({"contestant": name, **summary}), flush=True)


async def _measure_one(
    name: str,
    round_number: int,
    upstream: Hop,
    workdir: Path,
    what: set[str],
    args: argparse.Namespace,
) -> dict[str, object]:
    """One round of one contestant. Each memory measurement gets a contestant of its own: a
    process keeps the memory it freed, and a second measurement in it would reuse that."""
    result: dict[str, object] = {"contestant": name, "round": round_number}
    memory = [(key, first) for key, first in _MEMORY if key in what]
    for instance, measuring in enumerate([None, *memory]):
        directory = workdir / f"{name.replace('/', '_')}-{round_number}-{instance}"
        directory.mkdir()
        async with contestant(name, upstream, directory, args.flags, args.prototypes) as hop:
            await wrk(hop.url + "/completion", 16, 1, directory)  # warm-up
            if measuring is not None:
                key, first = measuring
                streams = args.streams if not first else min(args.streams, 250)
                kib = await memory_per_stream(hop, streams, first)
                result[_MEMORY_RESULTS[key]] = round(kib, 2)
                continue
            if "small" in what:
                cpu, run = await small_requests(hop, args.seconds, directory)
                result["cpu_ms_per_request"] = round(cpu, 4)
                result["requests_per_second"] = round(run.served / args.seconds)
                result["p99_ms_16_connections"] = round(run.p99_ms, 3)
            if "latency" in what:
                run = await wrk(hop.url + "/completion", 1, 3, directory)
                result["p50_ms_one_connection"] = round(run.p50_ms, 3)
            if "chunks" in what:
                result["cpu_us_per_chunk"] = round(await chunk_cost(hop), 2)
            if args.profile is not None and name not in ("direct", "nginx"):  # not Python
                args.profile.mkdir(parents=True, exist_ok=True)
                await profile(hop, args.seconds, directory, args.profile, name)
    return result


_MEMORY = (("memory", 0), ("memory-long", 200))
"""``--what`` keys of the memory measurements, and the events each stream sends first, at 50 a
second (250 streams at most then: 12,500 chunks a second)."""
_MEMORY_RESULTS = {"memory": "kib_per_stream", "memory-long": "kib_per_stream_after_19_kib"}


# -- instructions: callgrind's count, for comparing builds on a shared machine -------------------


async def instructions(args: argparse.Namespace) -> None:
    """User-space instructions per small request and per relayed chunk of each contestant,
    counted by callgrind: unlike CPU seconds, the count does not move with what else runs on
    the machine (0.2% between runs), so a cut of 2% shows. What the kernel does for the
    process's system calls is not in it (``strace -c`` counts those)."""
    what = set(args.what.split(","))
    async with _fake_upstream_in("paddler-instructions-") as (workdir, upstream):
        for name in args.contestants.split(","):
            directory = _directory_of(workdir, name)
            result: dict[str, object] = {"contestant": name}
            async with _under_callgrind(name, upstream, directory, args) as (hop, count):
                if "small" in what:
                    await _small_load(hop, 200)
                    per_request = await count(_small_load(hop, args.requests)) / args.requests
                    result["k_instructions_per_request"] = round(per_request / 1000, 1)
                if "chunks" in what:
                    costs = []
                    for chunks, requests in ((10, 64), (100, 32)):
                        path = f"/v1/chat/completions?chunks={chunks}&interval=20"
                        load = _streams_load(hop, path, requests)
                        costs.append(await count(load) / requests)
                    result["k_instructions_per_chunk"] = round((costs[1] - costs[0]) / 90 / 1000, 2)
            print(json.dumps(result), flush=True)


async def syscalls(args: argparse.Namespace) -> None:
    """System calls per small request of each contestant (``strace -c -f`` attached to its
    process while ``wrk -c16`` runs for ``--seconds``): what ``instructions`` leaves out. Under
    strace a process runs several times slower, so its loop batches more per turn than it would
    otherwise: the counts per request are the ones that matter, not the rate."""
    async with _fake_upstream_in("paddler-syscalls-") as (workdir, upstream):
        for name in args.contestants.split(","):
            directory = _directory_of(workdir, name)
            async with contestant(name, upstream, directory, args.flags, args.prototypes) as hop:
                await wrk(hop.url + "/completion", 16, 1, directory)  # warm-up
                output = directory / "strace.txt"
                tracer = await asyncio.create_subprocess_exec(
                    "strace", "-c", "-f", "-p", str(hop.pid), "-o", str(output),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(0.5)  # attached to every thread
                run = await wrk(hop.url + "/completion", 16, args.seconds, directory)
                tracer.send_signal(signal.SIGINT)  # strace writes its table and detaches
                await tracer.wait()
            calls = _strace_counts(output.read_text())
            per_request = {call: round(count / run.served, 2) for call, count in calls.items()}
            result = {
                "contestant": name,
                "syscalls_per_request": round(sum(calls.values()) / run.served, 2),
                **{call: value for call, value in per_request.items() if value >= 0.01},
            }
            print(json.dumps(result), flush=True)


@contextlib.asynccontextmanager
async def _fake_upstream_in(prefix: str) -> AsyncIterator[tuple[Path, Hop]]:
    """A temporary directory, and the fast upstream running in it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        workdir = Path(temporary)
        async with fake_upstream(workdir) as upstream:
            yield workdir, upstream


def _directory_of(workdir: Path, name: str) -> Path:
    """A directory of its own for the contestant ``name`` (``paddler@TREE`` has slashes)."""
    directory = workdir / name.replace("/", "_")
    directory.mkdir()
    return directory


def _strace_counts(table: str) -> dict[str, int]:
    """``strace -c``'s table: calls per system call."""
    counts: dict[str, int] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def _dumps(workdir: Path) -> set[Path]:
    return set(workdir.glob("callgrind.out*"))


def _totals(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


async def _small_load(hop: Hop, requests: int, concurrency: int = 4) -> None:
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in range(requests // concurrency):
                async with session.post(
                    hop.url + "/completion",
                    data=SMALL_BODY,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"answered {response.status}")

        await asyncio.gather(*(client() for _ in range(concurrency)))


async def _streams_load(hop: Hop, path: str, requests: int, concurrency: int = 16) -> None:
    await asyncio.gather(
        *(_stream_requests(hop, path, requests // concurrency) for _ in range(concurrency))
    )


@contextlib.asynccontextmanager
async def _under_callgrind(
    name: str, upstream: Hop, workdir: Path, args: argparse.Namespace
) -> AsyncIterator[tuple[Hop, Callable[[Awaitable[None]], Awaitable[int]]]]:
    """The contestant under ``valgrind --tool=callgrind``, counting nothing until asked; yields
    it and a function that counts the instructions it spends while an awaitable runs."""
    output = workdir / "callgrind.out"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={output}",
    ]

    async def control(pid: int, *options: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "callgrind_control", *options, str(pid),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await process.wait():
            raise RuntimeError(f"callgrind_control {' '.join(options)} failed")

    def counter(pid: int) -> Callable[[Awaitable[None]], Awaitable[int]]:
        async def count(load: Awaitable[None]) -> int:
            await control(pid, "--instr=on")
            await control(pid, "--zero")
            await load
            await control(pid, "--instr=off")
            before = _dumps(workdir)
            await control(pid, "--dump")
            (dump,) = _dumps(workdir) - before
            return _totals(dump)

        return count

    kind, _, tree = name.partition("@")
    if kind in _PADDLERS:
        async with (
            _balancer(
                workdir, tree, "--routing=slots", "--agent-stale-after=1h", *_PADDLERS[kind],
                *args.flags, prefix=prefix,
            ) as paddler,
            _registered(paddler, upstream),
        ):  # fmt: skip
            yield Hop(paddler.proxy_url, paddler.pid), counter(paddler.pid)
    elif name in args.prototypes:
        upstream_port = int(upstream.url.rsplit(":", 1)[1])
        command = [*prefix, *shlex.split(args.prototypes[name])]
        async with running_hop(
            command, upstream_port, workdir / "prototype.log", ready_timeout=300
        ) as (url, pid):
            yield Hop(url, pid), counter(pid)
    else:
        raise SystemExit(f"instructions: {name!r} is not paddler[@TREE] or a --prototype")


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["upstream"]:
        import uvloop

        uvloop.run(serve_upstream(int(argv[1])))
        return
    mode = argv[0] if argv[:1] in (["instructions"], ["syscalls"]) else "measure"
    if mode != "measure":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m bench.profile_proxy")
    parser.add_argument("--contestants", default="direct,nginx,paddler")
    parser.add_argument("--what", default="small,latency,chunks,memory,memory-long")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--prototype", action="append", default=[], metavar="NAME=COMMAND")
    parser.add_argument("--requests", type=int, default=400, help="instructions: small requests")
    parser.add_argument("flags", nargs="*", help="after --: flags for paddler balancer")
    args = parser.parse_args(argv)
    args.prototypes = dict(entry.split("=", 1) for entry in args.prototype)
    import uvloop

    modes = {"instructions": instructions, "syscalls": syscalls, "measure": measure}
    uvloop.run(modes[mode](args))


if __name__ == "__main__":
    main(sys.argv[1:])
