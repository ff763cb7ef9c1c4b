"""The fleet-size sweep: what each request, and each agent's report, costs at 2, 100 and 1,000.

For each size a fresh ``paddler balancer`` gets that many simulated agents (``fake_agents``),
one per port of one fast upstream. Then:

- idle: nothing but the agents' reports for ``idle_seconds``; the balancer's CPU over that time
  is its control plane's cost, as a share of a core and per status frame (the agents count the
  frames they sent);
- small requests from wrk at ``latency_connections`` (p50, p99) and at ``load_connections``
  (CPU per request: the median of ``load_rounds`` cells), as in the contestants' cells;
- the same load through nginx over the same servers, with ``random two least_conn`` (two
  servers drawn at random, the less busy taken: a pick that costs the same at any fleet size,
  as Paddler's does). Its growth from 2 to 1,000 servers is what spreading requests over that
  many connections costs a proxy anyway (colder caches), whatever its pick.

The 2-agent fleet is the reference: the target is that 1,000 agents cost no more per request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from bench.memory import tree_rss_bytes
from bench.nginx import running_nginx
from bench.runner import say
from bench.scale_config import ScaleConfig
from bench.scale_contestants import SMALL_BODY
from bench.scale_measure import LoadCell, Meter, Usage, wrk_cell
from bench.simulated_fleet import running_fleet, running_upstream
from bench.wrk import lua_script


@dataclass
class FleetCell:
    agents: int
    idle: Usage
    frames: int
    latency: LoadCell
    load: LoadCell
    rss: int
    setup_seconds: float
    agent_failures: int = 0
    nginx: LoadCell | None = None
    """nginx's load cell over the same servers (``random two least_conn``)."""
    load_rounds: list[float] = field(default_factory=list)
    """Paddler's CPU per request in each of the ``load_rounds`` cells; ``load`` is the median's."""

    @property
    def idle_core_share(self) -> float:
        return self.idle.cores("proxy")

    @property
    def idle_us_per_frame(self) -> float:
        proxy = self.idle.cpu.get("proxy", 0.0)
        return proxy / self.frames * 1e6 if self.frames else float("nan")


def median_cell(cells: list[LoadCell]) -> LoadCell:
    """The cell whose CPU per request is the median (the lower middle one of an even count)."""
    ranked = sorted(cells, key=lambda cell: cell.proxy_ms_per_request)
    return ranked[(len(ranked) - 1) // 2]


@dataclass
class FleetResults:
    cells: list[FleetCell] = field(default_factory=list)


async def measure_fleets(config: ScaleConfig, workdir: Path) -> FleetResults:
    results = FleetResults()
    script = workdir / "fleet-small.lua"
    script.write_text(lua_script("/completion", SMALL_BODY))
    flags = ["--max-client-connections=4096", *config.paddler_flags]
    largest = max(config.fleet_sizes)
    async with running_upstream(largest, config.slots, workdir, "fast-upstream-fleet") as upstream:
        for size in config.fleet_sizes:
            loop = asyncio.get_running_loop()
            began = loop.time()
            async with running_fleet(
                upstream, size, workdir, flags, name=f"paddler-fleet-{size}"
            ) as fleet:
                setup = loop.time() - began
                meter = Meter(
                    {
                        "proxy": fleet.paddler.balancer_pid,
                        "upstream": upstream.child.pid,
                        "agents": fleet.agents.pid,
                    }
                )
                await asyncio.sleep(1.0)  # the first reports after registration have arrived
                frames_before = (await fleet.agents.ask("stats"))["frames"]
                before = meter.start()
                await asyncio.sleep(config.idle_seconds)
                idle = meter.since(before)
                stats = await fleet.agents.ask("stats")
                frames = stats["frames"] - frames_before
                url = fleet.paddler.proxy_url
                name = f"paddler-{size}"
                await wrk_cell(meter, name, "warm-up", url, script, config.load_connections, 1.0)
                latency = await wrk_cell(
                    meter,
                    name,
                    "latency",
                    url,
                    script,
                    config.latency_connections,
                    config.cell_seconds,
                )
                loads = [
                    await wrk_cell(
                        meter, name, "load", url, script, config.load_connections,
                        config.cell_seconds,
                    )
                    for _ in range(config.load_rounds)
                ]  # fmt: skip
                load = median_cell(loads)
                cell = FleetCell(
                    agents=size,
                    idle=idle,
                    frames=frames,
                    latency=latency,
                    load=load,
                    rss=tree_rss_bytes(fleet.paddler.balancer_pid),
                    setup_seconds=setup,
                    agent_failures=(await fleet.agents.ask("stats"))["failures"],
                    load_rounds=[one.proxy_ms_per_request for one in loads],
                )
                results.cells.append(cell)
            nginx_dir = workdir / f"nginx-fleet-{size}"
            nginx_dir.mkdir()
            async with running_nginx(
                upstream.backends(size), nginx_dir, "random two least_conn"
            ) as nginx:
                meter = Meter({"proxy": nginx.pid, "upstream": upstream.child.pid})
                name = f"nginx-{size}"
                await wrk_cell(
                    meter, name, "warm-up", nginx.url, script, config.load_connections, 1.0
                )
                nginx_loads = [
                    await wrk_cell(
                        meter, name, "load", nginx.url, script, config.load_connections,
                        config.cell_seconds,
                    )
                    for _ in range(config.load_rounds)
                ]  # fmt: skip
                cell.nginx = median_cell(nginx_loads)
                say(
                    f"fleet {size}: idle {cell.idle_core_share * 100:.1f}% of a core, "
                    f"{cell.idle_us_per_frame:.0f} µs/frame; p50 {latency.p50 * 1000:.2f} ms; "
                    f"{load.proxy_ms_per_request:.3f} ms CPU/request at {load.requests_per_second:.0f} req/s"
                )
    return results
