"""The dashboard's widgets. Each one draws a value it is given and fetches nothing itself."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Sparkline, Static

from paddler.dashboard.snapshot import AgentView, FleetView, Stats
from paddler.safe_text import escape_unprintable


def format_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_window(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g}s"


class StatusLine(Static):
    """Whether the balancer answers; red and explicit when it does not."""

    DEFAULT_CSS = """
    StatusLine { padding: 0 1; background: $success-darken-2; color: $text; }
    StatusLine.-failing { background: $error; }
    """

    def show_connected(self, addr: str, refresh_interval: float, has_stats: bool) -> None:
        self.remove_class("-failing")
        text = f"● balancer {addr} · refreshed every {refresh_interval:g}s"
        if not has_stats:
            text += " · no /api/v1/stats on this balancer: charts hidden"
        self.update(text)

    def show_failure(
        self, addr: str, problem: str, refresh_interval: float, last_seen: float | None
    ) -> None:
        """``problem`` says what went wrong, such as ``unreachable: <reason>``."""
        self.add_class("-failing")
        seen = "never reached" if last_seen is None else f"last data {format_age(last_seen)}"
        self.update(f"✖ balancer {addr} {problem} · {seen} · retrying every {refresh_interval:g}s")


class FleetTotals(Static):
    """Agents, the slots the balancer can dispatch to, and requests waiting for one."""

    DEFAULT_CSS = "FleetTotals { padding: 0 1; height: auto; }"

    def show(self, fleet: FleetView) -> None:
        buffered = fleet.requests_buffered
        self.update(
            Text.assemble(
                ("Agents", "bold"),
                f" {len(fleet.agents)} ({fleet.usable_agents} usable)  │  ",
                ("Slots", "bold"),
                f" idle {fleet.slots_idle} · processing {fleet.slots_processing}"
                f" · total {fleet.slots_total}  │  ",
                ("Buffered", "bold"),
                " ",
                (str(buffered), "bold yellow" if buffered else ""),
            )
        )


class TrafficChart(Horizontal):
    """One series as a sparkline, labelled with its latest and highest value."""

    DEFAULT_CSS = """
    TrafficChart { height: 2; }
    TrafficChart > Label { width: 44; padding: 0 1; }
    TrafficChart > Sparkline { width: 1fr; height: 2; }
    """

    def __init__(self, title: str, *, id: str) -> None:
        super().__init__(id=id)
        self._title = title

    def compose(self) -> ComposeResult:
        yield Label(self._title)
        yield Sparkline([], summary_function=max)

    def show(self, values: list[float], window: str) -> None:
        latest = values[-1] if values else 0.0
        peak = max(values, default=0.0)
        self.query_one(Label).update(f"{self._title}  now {latest:g} · peak {peak:g} · {window}")
        self.query_one(Sparkline).data = values


class TrafficCharts(Vertical):
    """Recent traffic from ``/api/v1/stats``; hidden when the balancer has no such endpoint."""

    DEFAULT_CSS = "TrafficCharts { height: auto; margin: 1 0; }"

    _CHARTS: tuple[tuple[str, str, Callable[[Stats], list[float]]], ...] = (
        ("requests", "requests/s", Stats.requests_per_second),
        ("errors", "errors/s", Stats.errors_per_second),
        ("buffered", "buffered", Stats.requests_buffered),
        ("slots", "slots processing", Stats.slots_processing),
    )

    def compose(self) -> ComposeResult:
        for key, title, _ in self._CHARTS:
            yield TrafficChart(title, id=f"chart-{key}")

    def show(self, stats: Stats | None) -> None:
        self.display = stats is not None
        if stats is None:
            return
        window = format_window(len(stats.series) * stats.interval_seconds)
        for key, _, values in self._CHARTS:
            self.query_one(f"#chart-{key}", TrafficChart).show(values(stats), window)


class AgentTable(DataTable[Text | str]):
    """One row per agent, keyed by its id, updated in place so the cursor stays put."""

    COLUMNS = (
        ("name", "Name"),
        ("address", "Address"),
        ("models", "Models"),
        ("idle", "Idle"),
        ("processing", "Processing"),
        ("total", "Total"),
        ("state", "State"),
        ("circuit", "Circuit"),
        ("report", "Last report"),
    )

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    def show(self, agents: tuple[AgentView, ...]) -> None:
        wanted = {agent.id: agent for agent in sorted(agents, key=lambda agent: agent.name)}
        for row_key in list(self.rows):
            if row_key.value not in wanted:
                self.remove_row(row_key)
        present = {row_key.value for row_key in self.rows}
        for agent_id, agent in wanted.items():
            cells = agent_cells(agent)
            if agent_id in present:
                for (column, _), value in zip(self.COLUMNS, cells, strict=True):
                    self.update_cell(agent_id, column, value)
            else:
                self.add_row(*cells, key=agent_id)


def agent_cells(agent: AgentView) -> tuple[Text | str, ...]:
    # Text, never str: the table would parse a str as markup, and an agent chose these.
    return (
        shown(agent.name),
        shown(agent.url),
        shown(", ".join(agent.models) or "—"),
        str(agent.slots_idle),
        str(agent.slots_processing),
        str(agent.slots_total),
        describe_state(agent),
        Text("open", style="bold red") if agent.circuit_open else Text("closed"),
        format_age(agent.last_report_age),
    )


def shown(text: str, style: str = "") -> Text:
    """Text an agent sent, as plain text: no markup, and no control character reaches the
    terminal."""
    return Text(escape_unprintable(text), style=style)


def describe_state(agent: AgentView) -> Text:
    if not agent.verified:
        reason = agent.verification or "the balancer has not reached it yet"
        return shown(f"unverified: {reason}", style="yellow")
    if agent.state == "ok":
        return Text("ok", style="green")
    text = agent.state if agent.error is None else f"{agent.state}: {agent.error}"
    return shown(text, style="yellow" if agent.state == "loading" else "red")
