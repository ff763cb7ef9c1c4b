"""The Textual app: polls the balancer every ``refresh_interval`` and shows what it learned.

While the balancer does not answer, the last data stays on screen, dimmed, under a red line that
says why; polling goes on until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Header

from paddler.dashboard.client import BalancerUnreachable, FetchError, ManagementClient
from paddler.dashboard.config import DashboardConfig
from paddler.dashboard.snapshot import DashboardSnapshot
from paddler.dashboard.widgets import AgentTable, FleetTotals, StatusLine, TrafficCharts
from paddler.tls import client_context


class DashboardApp(App[None]):
    TITLE = "Paddler"
    CSS = """
    #agents { height: 1fr; }
    .-stale { opacity: 50%; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        # Nothing here to copy, so Ctrl-C quits as it does in any other terminal program.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("r", "refresh_now", "Refresh now"),
    ]

    def __init__(self, config: DashboardConfig) -> None:
        super().__init__()
        self.config = config
        self.snapshot: DashboardSnapshot | None = None
        """The latest data the balancer gave, kept while it is unreachable."""
        self.failure: FetchError | None = None
        """Why the latest poll failed; None after a successful one."""
        self._last_success: float | None = None
        self._wake = asyncio.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine(f"connecting to {self.config.management_addr}…", id="status")
        yield FleetTotals(id="totals")
        yield TrafficCharts(id="charts")
        yield AgentTable(id="agents")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"balancer {self.config.management_addr}"
        self.query_one(TrafficCharts).display = False
        self.run_worker(self._poll(), name="poll", exit_on_error=True)

    def action_refresh_now(self) -> None:
        self._wake.set()

    async def _poll(self) -> None:
        config = self.config
        tls = (
            client_context(config.management_ca_file)
            if config.management_scheme == "https"
            else None
        )
        async with ManagementClient(config.management_url, config.request_timeout, tls) as client:
            while True:
                self._wake.clear()
                try:
                    outcome: DashboardSnapshot | FetchError = await client.fetch()
                except FetchError as error:
                    outcome = error
                # Shutting down, Textual removes the widgets before it cancels the workers.
                if not self.is_running:
                    return
                if isinstance(outcome, FetchError):
                    self._show_failure(outcome)
                else:
                    self._show(outcome)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.refresh_interval):
                        await self._wake.wait()

    def _show(self, snapshot: DashboardSnapshot) -> None:
        self.snapshot = snapshot
        self.failure = None
        self._last_success = time.monotonic()
        self.query_one(StatusLine).show_connected(
            self.config.management_addr, self.config.refresh_interval, snapshot.stats is not None
        )
        self.query_one(FleetTotals).show(snapshot.fleet)
        self.query_one(TrafficCharts).show(snapshot.stats)
        self.query_one(AgentTable).show(snapshot.fleet.agents)
        for widget in self.query(".-stale"):
            widget.remove_class("-stale")

    def _show_failure(self, error: FetchError) -> None:
        self.failure = error
        last_seen = None if self._last_success is None else time.monotonic() - self._last_success
        problem = "unreachable" if isinstance(error, BalancerUnreachable) else "answered oddly"
        self.query_one(StatusLine).show_failure(
            self.config.management_addr,
            f"{problem}: {error}",
            self.config.refresh_interval,
            last_seen,
        )
        for widget in (
            self.query_one(FleetTotals),
            self.query_one(TrafficCharts),
            self.query_one(AgentTable),
        ):
            widget.add_class("-stale")
