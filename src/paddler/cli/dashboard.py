"""``paddler dashboard``: the fleet, live, in a terminal (needs the ``tui`` extra)."""

from __future__ import annotations

import click

from paddler.cli.options import DURATION, option
from paddler.cli.process import require, resolve_host


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    from paddler.dashboard.config import parse_host_port

    try:
        host, port = parse_host_port(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    return resolve_host(host), port


@click.command()
@option(
    "--management-addr",
    default="127.0.0.1:8085",
    callback=_host_port,
    help="The balancer's management address, HOST:PORT ([HOST]:PORT for IPv6).",
)
@option(
    "--refresh-interval",
    type=DURATION,
    default="1s",
    help="How often to ask the balancer for the fleet and its traffic.",
)
def dashboard(management_addr: tuple[str, int], refresh_interval: float) -> None:
    """Watch the fleet live in this terminal: agents, slots, buffered requests and traffic."""
    if refresh_interval <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--refresh-interval")
    require("textual", "tui", "paddler dashboard")
    from paddler.dashboard.app import DashboardApp
    from paddler.dashboard.config import DashboardConfig

    host, port = management_addr
    config = DashboardConfig(
        management_host=host, management_port=port, refresh_interval=refresh_interval
    )
    DashboardApp(config).run()
