"""Many simulated agents in one process: a fleet of 1,000 without 1,000 Python processes.

Usage: ``python -m bench.fake_agents MANAGEMENT_URL --slots S [--busy] PORT...`` (the scale benchmark starts
it; see ``child_control`` for the stdin/stdout contract). Each port gets one agent, which does on
the wire what ``paddler agent`` does (``paddler.agent.balancer_link``): a WebSocket to
``/api/v1/agents/socket``, ``register`` with its name, ``127.0.0.1`` and its port and a first
status, waits for ``registered``, then sends ``status`` at least once a second (with up to 5 %
of jitter, and a random phase, so that 1,000 agents do not report in lockstep) and at once when
what it reports changes. Frames are encoded once per state, not per send: this process must cost
far less than the balancer's work on them.

What the agents report, all together (commands):

- ``free``: every slot idle (``slots_idle`` = SLOTS), the normal case;
- ``busy``: no slot idle (``slots_processing`` = SLOTS), for the buffer sweep: the balancer
  counts them as foreign work and buffers every request. ``free`` afterwards is a report with
  more idle slots, which wakes the waiters;
- ``stats``: frames sent so far, agents registered now, socket failures.

The balancer bounds the slots it counts by ``/props`` ``total_slots`` of each address, so SLOTS
must match the fast upstream's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.child_control import run_fast, serve_commands
from bench.processes import raise_open_file_limit
from paddler import protocol
from paddler.protocol import LlamaCppState, Register, Status

INTERVAL = 1.0
JITTER = 0.05
MODEL = "fake-model"


@dataclass
class Fleet:
    slots: int
    busy: bool = False
    frames: int = 0
    registered: int = 0
    failures: int = 0
    version: int = 0
    """Changes with what the agents report; each agent sends at once when it does."""

    def __post_init__(self) -> None:
        self.changed = asyncio.Event()
        self._frames = {busy: protocol.encode(self.status(busy)) for busy in (False, True)}

    def status(self, busy: bool) -> Status:
        idle, processing = (0, self.slots) if busy else (self.slots, 0)
        return Status(
            state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing, models=(MODEL,)
        )

    def frame(self) -> str:
        return self._frames[self.busy]

    def set_busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            self.version += 1
            self.changed.set()
            self.changed = asyncio.Event()


async def agent(session: aiohttp.ClientSession, url: str, port: int, fleet: Fleet) -> None:
    """One agent for the server on ``port``, until cancelled."""
    register = Register(
        name=f"sim-{port}", host="127.0.0.1", port=port, status=fleet.status(fleet.busy)
    )
    async with session.ws_connect(url + protocol.AGENT_SOCKET_PATH, heartbeat=10.0) as socket:
        await socket.send_str(protocol.encode(register))
        reply = protocol.parse_balancer_message(await socket.receive_str())
        if isinstance(reply, protocol.Error):
            raise RuntimeError(f"the balancer refused sim-{port}: {reply.message}")
        fleet.registered += 1
        listener = asyncio.create_task(_drain(socket))
        try:
            await asyncio.sleep(random.uniform(0, INTERVAL))
            while not listener.done():
                version, changed = fleet.version, fleet.changed
                await socket.send_str(fleet.frame())
                fleet.frames += 1
                if version == fleet.version:
                    pause = INTERVAL * random.uniform(1 - JITTER, 1 + JITTER)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await changed.wait()
        finally:
            fleet.registered -= 1
            listener.cancel()
            await asyncio.wait([listener])


async def _drain(socket: aiohttp.ClientWebSocketResponse) -> None:
    """Read what the balancer sends (pings are answered while reading) until the socket ends."""
    async for _ in socket:
        pass


async def keep_agent(session: aiohttp.ClientSession, url: str, port: int, fleet: Fleet) -> None:
    """Run ``agent``; if its socket fails, count it and connect again after a second."""
    while True:
        try:
            await agent(session, url, port, fleet)
        except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as error:
            fleet.failures += 1
            print(f"sim-{port}: {error!r}", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)


async def main(url: str, slots: int, busy: bool, ports: list[int]) -> None:
    raise_open_file_limit()
    fleet = Fleet(slots, busy)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(keep_agent(session, url, port, fleet)) for port in ports]

        async def handle(command: str) -> dict[str, Any]:
            if command in ("busy", "free"):
                fleet.set_busy(command == "busy")
                return {"busy": fleet.busy}
            if command == "stats":
                return {
                    "frames": fleet.frames,
                    "registered": fleet.registered,
                    "failures": fleet.failures,
                }
            raise ValueError(f"unknown command {command!r}")

        print(json.dumps({"agents": len(ports)}), flush=True)
        try:
            await serve_commands(handle)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fake_agents")
    parser.add_argument("management_url")
    parser.add_argument("ports", type=int, nargs="+")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--busy", action="store_true", help="start with no slot idle")
    arguments = parser.parse_args()
    run_fast(main(arguments.management_url, arguments.slots, arguments.busy, arguments.ports))
