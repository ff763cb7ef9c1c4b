"""What the fleet's bookkeeping costs, in process: a pick, a report, and filling the buffer.

Usage: ``python -m bench.fleet_costs`` (inside the venv, from the repository's root). No sockets:
this measures the pool, the capacity index and the buffer alone, at 2 and 1,000 agents, with
each routing policy, and the buffer filled to 1,000 and 10,000 waiters with nothing free.
Issue 10's figures (a quiet moment of this machine's 2 shared cores): pick, reserve and release
with 1,000 agents 1,365 µs before the capacity index, 14 µs after; filling the buffer to 10,000
waiters 46 a second before, 48,800 after.
"""

from __future__ import annotations

import asyncio
import time

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.request_buffer import RequestBuffer
from paddler.balancer.routing.policies import Demand, make_policy
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join


def status(idle: int, processing: int = 0) -> Status:
    return Status(state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing)


def picks(policy: str, agents: int, rounds: int = 20000) -> tuple[float, float]:
    """Microseconds per pick+reserve+release, and per report."""
    pool = AgentControllerPool(policy=make_policy(policy, 64 * 1024 * 1024), max_agents=2000)
    fleet = [
        join(pool, f"a{number}", Address("http", "127.0.0.1", number + 1), status(4))[0]
        for number in range(agents)
    ]
    prompt = "x" * 2000
    began = time.perf_counter()
    for number in range(rounds):
        demand = Demand.of(True, None, prompt + str(number) if policy == "prefix" else None)
        agent = pool.pick(demand)
        assert agent is not None
        pool.reserve(agent, demand).release()
    pick = (time.perf_counter() - began) / rounds * 1e6
    began = time.perf_counter()
    for number in range(rounds // 4):
        agent = fleet[number % agents]
        pool.report(agent, agent.session_id, status(4 - number % 2, number % 2))
    report = (time.perf_counter() - began) / (rounds // 4) * 1e6
    return pick, report


async def fill(waiters: int) -> float:
    """Waiters a second that join a buffer with nothing free."""
    pool = AgentControllerPool()
    join(pool, "a", Address("http", "127.0.0.1", 1), status(0, 4))
    buffer = RequestBuffer(pool, size=2 * waiters, timeout=600)
    began = time.perf_counter()
    tasks = [asyncio.create_task(buffer.acquire(Demand(True))) for _ in range(waiters)]
    await asyncio.sleep(0)  # one turn of the loop: every task runs until it waits
    assert buffer.waiting == waiters
    rate = waiters / (time.perf_counter() - began)
    buffer.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def main() -> None:
    for policy in ("slots", "prefix"):
        for agents in (2, 1000):
            pick, report = picks(policy, agents)
            print(
                f"{policy:6} {agents:5} agents: pick+reserve+release {pick:7.1f} µs, "
                f"report {report:5.1f} µs"
            )
    for waiters in (1000, 10000):
        print(f"buffer filled to {waiters}: {asyncio.run(fill(waiters)):,.0f} waiters/s")


if __name__ == "__main__":
    main()
