"""The terminal dashboard shows the live fleet of a real balancer, and survives one that is gone."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
from textual.pilot import Pilot
from textual.widgets import Label, Sparkline

from paddler.dashboard.app import DashboardApp
from paddler.dashboard.config import DashboardConfig
from paddler.dashboard.widgets import AgentTable, FleetTotals, StatusLine, TrafficChart
from paddler.protocol import LlamaCppState, Status
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.fake_management_api import agent_json, fake_management_api
from tests.support.upstream import fake_upstream, not_found

REFRESH = 0.05


@contextlib.asynccontextmanager
async def dashboard(host: str, port: int, refresh: float = REFRESH) -> AsyncIterator[Pilot[None]]:
    config = DashboardConfig(management_host=host, management_port=port, refresh_interval=refresh)
    app = DashboardApp(config)
    async with app.run_test(size=(160, 40)) as pilot:
        yield pilot


@contextlib.asynccontextmanager
async def llamacpp_ports(count: int) -> AsyncIterator[list[int]]:
    """Ports where something answers as llama.cpp does, for agents the balancer verifies."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(fake_upstream(not_found)) for _ in range(count)]


def management_addr(management_url: str) -> tuple[str, int]:
    host, port = management_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def status(pilot: Pilot[None]) -> str:
    return str(pilot.app.query_one(StatusLine).render())


def totals(pilot: Pilot[None]) -> str:
    return str(pilot.app.query_one(FleetTotals).render())


def rows(pilot: Pilot[None]) -> dict[str, list[str]]:
    """Every row of the agent table as the text of its cells, by agent name."""
    table = pilot.app.query_one(AgentTable)
    shown = [[str(cell) for cell in table.get_row(key)] for key in table.rows]
    return {row[0]: row for row in shown}


def slots(pilot: Pilot[None]) -> dict[str, tuple[str, str, str]]:
    """Idle, processing and total slots of each agent shown."""
    return {name: (row[3], row[4], row[5]) for name, row in rows(pilot).items()}


def charts_shown(pilot: Pilot[None]) -> bool:
    return pilot.app.query_one("#charts").display


async def test_dashboard_lists_every_agent_of_a_real_balancer(
    session: aiohttp.ClientSession,
) -> None:
    """Each agent appears with its address, models, slots, state, circuit and report age."""
    async with llamacpp_ports(2) as ports, running_balancer() as balancer:
        first, second = (
            ScriptedAgent(session, balancer.management_url),
            ScriptedAgent(session, balancer.management_url),
        )
        await first.register("alpha", ports[0], ok(idle=3, processing=1, models=("qwen",)))
        await second.register("beta", ports[1], ok(idle=2))
        async with dashboard(*management_addr(balancer.management_url)) as pilot:
            await wait_until(lambda: len(rows(pilot)) == 2)
            alpha = rows(pilot)["alpha"]
            assert alpha[1:8] == [
                f"http://127.0.0.1:{ports[0]}",
                "qwen",
                "3",
                "1",
                "4",
                "ok",
                "closed",
            ]
            assert alpha[8].endswith("s ago")
            assert rows(pilot)["beta"][2] == "—"
            assert "balancer 127.0.0.1" in status(pilot)
            # /api/v1/stats may or may not exist on this balancer: either way the fleet shows.
            assert charts_shown(pilot) == ("charts hidden" not in status(pilot))
        await first.close()
        await second.close()


async def test_dashboard_follows_agents_joining_reporting_and_leaving(
    session: aiohttp.ClientSession,
) -> None:
    """A new agent appears, new slot counts replace old ones, and a departed agent disappears."""
    async with llamacpp_ports(2) as ports, running_balancer() as balancer:
        first = ScriptedAgent(session, balancer.management_url)
        await first.register("alpha", ports[0], ok(idle=4))
        async with dashboard(*management_addr(balancer.management_url)) as pilot:
            await wait_until(lambda: slots(pilot) == {"alpha": ("4", "0", "4")})

            second = ScriptedAgent(session, balancer.management_url)
            await second.register("beta", ports[1], ok(idle=1, processing=1))
            await wait_until(lambda: "beta" in rows(pilot))

            await first.report(ok(idle=1, processing=3))
            await wait_until(
                lambda: slots(pilot) == {"alpha": ("1", "3", "4"), "beta": ("1", "1", "2")}
            )

            await second.close()
            await wait_until(lambda: list(rows(pilot)) == ["alpha"])
        await first.close()


async def test_fleet_totals_count_the_slots_of_usable_agents(
    session: aiohttp.ClientSession,
) -> None:
    """Totals add up the agents the balancer can use; a failing agent shows its error instead."""
    async with llamacpp_ports(3) as ports, running_balancer() as balancer:
        agents = [ScriptedAgent(session, balancer.management_url) for _ in range(3)]
        await agents[0].register("alpha", ports[0], ok(idle=3, processing=1))
        await agents[1].register("beta", ports[1], ok(idle=2, processing=2))
        await agents[2].register(
            "gamma",
            ports[2],
            Status(state=LlamaCppState.UNREACHABLE, error="connection refused"),
        )
        async with dashboard(*management_addr(balancer.management_url)) as pilot:
            await wait_until(lambda: len(rows(pilot)) == 3)
            assert "Agents 3 (2 usable)" in totals(pilot)
            assert "idle 5 · processing 3 · total 8" in totals(pilot)
            assert "Buffered 0" in totals(pilot)
            assert rows(pilot)["gamma"][6] == "unreachable: connection refused"
        for agent in agents:
            await agent.close()


async def test_dashboard_says_the_balancer_is_unreachable_on_a_closed_port() -> None:
    """Nothing listening is shown as unreachable, with the reason, and polling goes on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with dashboard("127.0.0.1", port) as pilot:
        await wait_until(lambda: "unreachable" in status(pilot))
        assert "never reached" in status(pilot)
        assert "retrying every" in status(pilot)
        assert pilot.app.query_one(StatusLine).has_class("-failing")
        assert pilot.app.is_running


async def test_dashboard_keeps_the_last_data_and_recovers_when_the_balancer_returns() -> None:
    """While the balancer is gone its last data stays, marked stale; it clears on its return."""
    async with fake_management_api() as api:
        api.agents["agents"] = [agent_json("alpha", 9001, idle=2)]
        async with dashboard(*api.addr) as pilot:
            await wait_until(lambda: "alpha" in rows(pilot))

            await api.stop()
            await wait_until(lambda: "unreachable" in status(pilot))
            assert "last data" in status(pilot)
            assert "alpha" in rows(pilot)
            assert pilot.app.query_one(AgentTable).has_class("-stale")

            api.agents["agents"] = [agent_json("beta", 9002, idle=1)]
            await api.start()
            await wait_until(lambda: list(rows(pilot)) == ["beta"])
            assert "unreachable" not in status(pilot)
            assert not pilot.app.query_one(AgentTable).has_class("-stale")


async def test_a_balancer_answering_an_error_is_reported_and_polled_again() -> None:
    """An HTTP error or a malformed answer is shown with its reason, and does not stop the app."""
    async with fake_management_api() as api:
        api.status = 500
        async with dashboard(*api.addr) as pilot:
            await wait_until(lambda: "answered HTTP 500" in status(pilot))

            api.status = 200
            api.agents = {"agents": [{"name": "alpha"}]}
            await wait_until(lambda: "agents[0].models is missing" in status(pilot))

            api.agents = {
                "agents": [agent_json("alpha", 9001, idle=2)],
                "slots_idle": 2,
                "slots_processing": 0,
                "requests_buffered": 0,
            }
            await wait_until(lambda: "alpha" in rows(pilot))


def stats_answer(requests: list[int], errors: list[int], interval: int = 1) -> object:
    return {
        "interval_seconds": interval,
        "window_seconds": 600,
        "series": [
            {
                "t": 1_700_000_000 + index * interval,
                "requests": count,
                "errors": error_count,
                "requests_buffered": index % 3,
                "slots_processing": 2,
                "slots_total": 8,
            }
            for index, (count, error_count) in enumerate(zip(requests, errors, strict=True))
        ],
    }


def chart(pilot: Pilot[None], key: str) -> tuple[str, list[float]]:
    """A chart's label and the values its sparkline draws."""
    widget = pilot.app.query_one(f"#chart-{key}", TrafficChart)
    return str(widget.query_one(Label).render()), list(widget.query_one(Sparkline).data or [])


async def test_charts_show_request_rate_and_errors_from_the_stats_endpoint() -> None:
    """Each sparkline draws its series per second, labelled with the latest and peak values."""
    async with fake_management_api() as api:
        api.stats = stats_answer(requests=[4, 10, 6] * 40, errors=[0, 2, 0] * 40, interval=2)
        async with dashboard(*api.addr) as pilot:
            await wait_until(lambda: charts_shown(pilot) and chart(pilot, "requests")[1])
            label, values = chart(pilot, "requests")
            assert values == [2.0, 5.0, 3.0] * 40
            assert "now 3 · peak 5 · 4 min" in label
            assert chart(pilot, "errors") == ("errors/s  now 0 · peak 1 · 4 min", [0, 1, 0] * 40)
            assert chart(pilot, "buffered")[1] == [0, 1, 2] * 40
            assert chart(pilot, "slots")[1] == [2] * 120

            api.stats = stats_answer(requests=[7], errors=[0])
            await wait_until(lambda: chart(pilot, "requests")[1] == [7.0])


async def test_charts_are_hidden_when_the_balancer_has_no_stats_endpoint() -> None:
    """An older balancer without /api/v1/stats still shows its fleet, with the charts hidden."""
    async with fake_management_api() as api:
        api.agents["agents"] = [agent_json("alpha", 9001, idle=2)]
        api.stats = stats_answer(requests=[1], errors=[0])
        async with dashboard(*api.addr) as pilot:
            await wait_until(lambda: charts_shown(pilot))

            api.stats = None
            await wait_until(lambda: not charts_shown(pilot))
            assert "charts hidden" in status(pilot)
            assert "alpha" in rows(pilot)


async def test_pressing_r_refreshes_at_once() -> None:
    """With a long refresh interval, the r key fetches the fleet without waiting for it."""
    async with fake_management_api() as api, dashboard(*api.addr, refresh=60) as pilot:
        await wait_until(lambda: "refreshed every 60s" in status(pilot))
        api.agents["agents"] = [agent_json("alpha", 9001, idle=2)]
        await pilot.press("r")
        await wait_until(lambda: "alpha" in rows(pilot), timeout=5)


async def test_agent_text_is_shown_as_text_and_an_unverified_agent_says_why() -> None:
    """Markup in a name or model is shown as typed, escapes are escaped, and an agent the
    balancer has not reached shows as unverified with the reason."""
    from textual.widgets._data_table import default_cell_formatter

    name = "[bold red]evil[/] [/]"
    async with fake_management_api() as api:
        api.agents["agents"] = [
            agent_json(name, 9001, idle=2, models=["[link=x]m[/link]\x1b[2J"]),
            agent_json(
                "rogue",
                9002,
                idle=0,
                slots_total=0,
                verified=False,
                verification="the balancer cannot reach it: refused",
            ),
        ]
        async with dashboard(*api.addr) as pilot:
            await wait_until(lambda: len(rows(pilot)) == 2)
            table = pilot.app.query_one(AgentTable)
            rendered = {
                key.value: [default_cell_formatter(cell).plain for cell in table.get_row(key)]
                for key in table.rows
            }
            assert rendered[f"{name}@127.0.0.1:9001"][0] == name
            assert rendered[f"{name}@127.0.0.1:9001"][2] == "[link=x]m[/link]\\x1b[2J"
            assert rendered["rogue@127.0.0.1:9002"][6] == (
                "unverified: the balancer cannot reach it: refused"
            )
            assert "Agents 2 (1 usable)" in totals(pilot)
