"""What a reservation over a worker's link costs (``--workers``), in process.

Usage: ``python -m bench.fleet_link_costs [ROUNDS]`` (inside the venv, from the repository's
root). A ``FleetHost`` and a ``RemoteFleet`` in one process, on a real Unix socket: each round
is one worker request's traffic with the host (acquire, then release with a request summary,
as ``forwarded_metrics`` sends it), awaited one at a time and then 64 at a time. Beside it, the
same rounds on a ``LocalFleet`` (one process, no socket). The difference is what the link adds
per request, both ends together (the worker's and the host's CPU on one core).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_host import FleetHost
from paddler.balancer.fleet.remote_fleet import RemoteFleet
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.fleet.state import Fleet, LocalFleet
from paddler.balancer.observability.forwarded_metrics import MetricsForwarder
from paddler.balancer.observability.observers import Observers, Outcome, RequestRecord
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join


async def rounds(
    fleet: Fleet, forwarder: MetricsForwarder | None, count: int, at_once: int
) -> float:
    """Microseconds per request, ``at_once`` requests in flight."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        guard = await fleet.acquire(Demand(True, None, "/completion"), loop.time() + 5)
        guard.release()
        if forwarder is not None:
            record = RequestRecord("r", "POST", "/completion", "/completion", True)
            record.status, record.outcome, record.ended = 200, Outcome.COMPLETED, record.started
            forwarder.request_finished(record)

    began = time.perf_counter()
    for _ in range(count // at_once):
        await asyncio.gather(*(one() for _ in range(at_once)))
    await asyncio.sleep(0.05)  # the last releases reach the host
    return (time.perf_counter() - began - 0.05) / count * 1e6


async def main(count: int) -> None:
    pool = AgentControllerPool()
    buffer = RequestBuffer(pool, size=100, timeout=5)
    join(pool, "a", Address("http", "127.0.0.1", 1), Status(state=LlamaCppState.OK, slots_idle=256))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fleet.sock"
        host = FleetHost(pool, buffer, pool.policy, Observers([]), path, workers=1)
        await host.start()
        remote = await RemoteFleet.connect(path, 5.0, 1)
        local = LocalFleet(pool, buffer, pool.policy)
        forwarder = MetricsForwarder(remote.send)
        for at_once in (1, 64):
            await rounds(remote, forwarder, count // 10, at_once)  # warm-up
            linked = await rounds(remote, forwarder, count, at_once)
            alone = await rounds(local, None, count, at_once)
            print(
                f"{at_once:>2} at once: local {alone:6.1f} µs a request, over the link "
                f"{linked:6.1f} µs (+{linked - alone:.1f})"
            )
        remote.disconnect()
        host.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
