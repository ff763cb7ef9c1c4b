"""How a status flood from one agent affects everybody else: ``/health`` latency meanwhile.

``python -m bench.status_flood [FRAMES]`` runs a balancer in this process, a server that answers
as llama.cpp does, and a flooder in a process of its own; it prints the longest, p99 and median
``/health`` latency while the flood lasts, and how the flooder's socket ended. On two shared
cores, 50,000 frames: 3-39 ms longest with the frame budget, 182-404 ms without it.

``python -m bench.status_flood flood MANAGEMENT_URL LLAMACPP_PORT FRAMES`` is the flooder alone
(also used by ``tests/integration/test_status_flood.py``): it registers and prints
``registered``, sends the frames as fast as it can, and prints
``closed <the balancer's close code> <frames sent>`` when the socket ends.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import aiohttp

from paddler import protocol
from paddler.protocol import LlamaCppState, Status


async def flood(management_url: str, port: int, frames: int) -> None:
    async with aiohttp.ClientSession() as session:
        # Each frame differs (slots and models change), so none can be skipped as a repeat.
        encoded = [
            protocol.encode(
                Status(
                    state=LlamaCppState.OK,
                    slots_idle=number % 3,
                    slots_processing=1,
                    models=(f"model-{number % 2}",),
                )
            )
            for number in range(frames)
        ]
        socket = await session.ws_connect(management_url + protocol.AGENT_SOCKET_PATH)
        first = Status(state=LlamaCppState.OK, slots_idle=2)
        register = protocol.Register(name="flooder", host="127.0.0.1", port=port, status=first)
        await socket.send_str(protocol.encode(register))
        await socket.receive_str()
        print("registered", flush=True)
        listener = asyncio.create_task(socket.receive())  # the balancer's error message
        sent = 0
        try:
            for frame in encoded:
                if listener.done():
                    break
                await socket.send_str(frame)
                sent += 1
        except (aiohttp.ClientError, ConnectionError):
            pass
        code = None
        message = await listener
        while message.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            message = await socket.receive()
        if message.type is aiohttp.WSMsgType.CLOSE:
            code = message.data  # the balancer's close code, as it sent it
        print("closed", code, sent, flush=True)


async def measure(frames: int) -> None:
    from aiohttp import web

    from paddler.balancer.service import Balancer
    from paddler.config import BalancerConfig

    async def llamacpp(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "total_slots": 4})

    app = web.Application()
    app.router.add_get("/{tail:.*}", llamacpp)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    balancer = Balancer(BalancerConfig(management_port=0, reverseproxy_port=0))
    shutdown = asyncio.Event()
    running = asyncio.create_task(balancer.run(shutdown))
    await balancer.ready.wait()
    management = f"http://127.0.0.1:{balancer.management_port}"
    latencies, ending = await health_during_flood(management, port, frames)
    shutdown.set()
    await running
    await runner.cleanup()
    print(
        f"{frames} frames, {ending}; /health over {len(latencies)} "
        f"requests: longest {latencies[-1] * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
        f"median {statistics.median(latencies) * 1000:.2f} ms"
    )


async def health_during_flood(management: str, port: int, frames: int) -> tuple[list[float], str]:
    """Flood ``management`` from a child process (an agent for the server on ``port``) while
    asking for ``/health``; return the latencies, sorted, and the flooder's closing line."""
    flooder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.status_flood",
        "flood",
        management,
        str(port),
        str(frames),
        stdout=asyncio.subprocess.PIPE,
    )
    assert flooder.stdout is not None
    await flooder.stdout.readline()
    ended = asyncio.create_task(flooder.stdout.readline())
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not ended.done():
            started = time.perf_counter()
            async with session.get(f"{management}/health") as response:
                await response.read()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    await flooder.wait()
    latencies.sort()
    return latencies, (await ended).decode().strip()


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        asyncio.run(flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
