"""What client connections can cost a ``paddler balancer`` process, measured from outside it.

Usage (inside the venv):

- ``python -m bench.client_connections slowloris [--connections 800] [--interval 3]
  [--after 60] [--silent-max 100] [-- balancer flags]``: open ``--connections`` connections
  that each trickle one byte of a request head every ``--interval`` seconds, and report how many
  are still open ``--after`` seconds later; then how long one connection that sends nothing
  stays open (at most ``--silent-max`` seconds). Issue 9's reproduction.
- ``python -m bench.client_connections overhead [--concurrency 16] [--seconds 10]``: requests
  per second and the balancer's CPU per request through the proxy to a fake upstream that
  answers at once, so that what is measured is the balancer's own per-request work.

Run it against another build of Paddler with ``PYTHONPATH=<that tree>/src``: the balancer is
started as ``python -m paddler balancer`` with the same interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp

from bench.cpu import process_seconds
from bench.paddler import running_balancer
from bench.processes import free_port, read_until, spawn, stop
from paddler import protocol

_FAST_UPSTREAM = """
import sys
from aiohttp import web

async def answer(request):
    await request.read()
    return web.json_response({"content": "hi", "stop": True})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", answer)
print("fast upstream ready", flush=True)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def slowloris(
    workdir: Path,
    connections: int,
    interval: float,
    after: float,
    silent_max: float,
    flags: list[str],
) -> None:
    async with running_balancer(workdir, *flags) as paddler:
        host, port = _host_port(paddler.proxy_url)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Trickle: " + b"a" * 10_000
        writers: list[asyncio.StreamWriter] = []
        readers: list[asyncio.StreamReader] = []
        for _ in range(connections):
            reader, writer = await asyncio.open_connection(host, port)
            readers.append(reader)
            writers.append(writer)
        started = time.monotonic()
        position = 0
        while time.monotonic() - started < after:
            for writer in writers:
                if not writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        writer.write(head[position : position + 1])
            position += 1
            await asyncio.sleep(min(interval, max(0.0, after - (time.monotonic() - started))))
        closed = await asyncio.gather(*(_closed(reader) for reader in readers))
        still_open = closed.count(False)
        print(
            f"{still_open} of {connections} connections trickling one byte every {interval:g}s "
            f"still open after {after:g}s"
        )
        for writer in writers:
            writer.close()

        seconds = await silent_lifetime(host, port, silent_max)
        lifetime = (
            f"more than {silent_max:g}s (still open)" if seconds is None else f"{seconds:.1f}s"
        )
        print(f"a connection that sent nothing stayed open {lifetime}")


async def silent_lifetime(host: str, port: int, silent_max: float) -> float | None:
    """Seconds until the balancer closes a connection that sends nothing; None past
    ``silent_max``."""
    reader, writer = await asyncio.open_connection(host, port)
    opened = time.monotonic()
    try:
        async with asyncio.timeout(silent_max):
            with contextlib.suppress(ConnectionError):
                await reader.read()
        return time.monotonic() - opened
    except TimeoutError:
        return None
    finally:
        writer.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True if the balancer closed (or reset) the connection; it never answers a partial head."""
    try:
        async with asyncio.timeout(0.01):
            return await reader.read(65536) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def overhead(workdir: Path, concurrency: int, seconds: float, flags: list[str]) -> None:
    async with (
        _fast_upstream(workdir) as upstream_port,
        running_balancer(workdir, "--routing=slots", "--agent-stale-after=1h", *flags) as paddler,
        aiohttp.ClientSession() as session,
    ):
        socket = await session.ws_connect(paddler.management_url + protocol.AGENT_SOCKET_PATH)
        status = protocol.Status(state=protocol.LlamaCppState.OK, slots_idle=10_000)
        register = protocol.Register(
            name="fast", host="127.0.0.1", port=upstream_port, status=status
        )
        await socket.send_str(protocol.encode(register))
        await socket.receive_str()
        url = paddler.proxy_url + "/completion"
        body = {"prompt": "hello", "n_predict": 1}
        await _load(session, url, body, concurrency, 1.0)  # warm-up
        cpu_before = process_seconds(paddler.balancer_pid)
        served = await _load(session, url, body, concurrency, seconds)
        cpu = process_seconds(paddler.balancer_pid) - cpu_before
        await socket.close()
        print(
            f"{served / seconds:.0f} requests/s with {concurrency} concurrent clients; "
            f"balancer CPU {cpu / served * 1e6:.0f} µs per request"
        )


async def _load(
    session: aiohttp.ClientSession, url: str, body: object, concurrency: int, seconds: float
) -> int:
    served = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal served
        while time.monotonic() < deadline:
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {await response.text()}")
                served += 1

    async with asyncio.TaskGroup() as clients:
        for _ in range(concurrency):
            clients.create_task(client())
    return served


@contextlib.asynccontextmanager
async def _fast_upstream(workdir: Path) -> AsyncIterator[int]:
    port = free_port()
    process = await spawn(
        sys.executable,
        "-c",
        _FAST_UPSTREAM,
        str(port),
        log_path=workdir / "upstream.log",
        stdout_pipe=True,
    )
    try:
        assert process.stdout is not None
        await read_until(process.stdout, "fast upstream ready", 30.0, process)
        # run_app binds after printing: wait for the port itself.
        async with asyncio.timeout(30.0):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield port
    finally:
        await stop(process)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_connections")
    commands = parser.add_subparsers(dest="command", required=True)
    loris = commands.add_parser("slowloris", help="issue 9's reproduction")
    loris.add_argument("--connections", type=int, default=800)
    loris.add_argument("--interval", type=float, default=3.0)
    loris.add_argument("--after", type=float, default=60.0)
    loris.add_argument("--silent-max", type=float, default=100.0)
    cost = commands.add_parser("overhead", help="requests/s and CPU per request")
    cost.add_argument("--concurrency", type=int, default=16)
    cost.add_argument("--seconds", type=float, default=10.0)
    for command in (loris, cost):
        command.add_argument("flags", nargs="*", help="after --: flags for paddler balancer")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="paddler-connections-") as temporary:
        workdir = Path(temporary)
        if args.command == "slowloris":
            measurement = slowloris(
                workdir, args.connections, args.interval, args.after, args.silent_max, args.flags
            )
        else:
            measurement = overhead(workdir, args.concurrency, args.seconds, args.flags)
        asyncio.run(measurement)


if __name__ == "__main__":
    main(sys.argv[1:])
