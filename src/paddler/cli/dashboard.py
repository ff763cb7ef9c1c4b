"""``paddler dashboard``: the fleet, live, in a terminal (needs the ``tui`` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from paddler.cli.options import DURATION, READABLE_FILE, option
from paddler.cli.process import require, resolve_host


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    from paddler.config import parse_host_port

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
@option(
    "--management-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="https: the management port has a certificate (--management-tls-cert); verify it "
    "against --management-ca-file.",
)
@option(
    "--management-ca-file",
    type=READABLE_FILE,
    default=None,
    help="PEM file of the CA(s) that signed the balancer's management certificate "
    "[default: the system's trust store].",
)
def dashboard(
    management_addr: tuple[str, int],
    refresh_interval: float,
    management_scheme: str,
    management_ca_file: Path | None,
) -> None:
    """Watch the fleet live in this terminal: agents, slots, buffered requests and traffic."""
    if refresh_interval <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--refresh-interval")
    if management_ca_file is not None:
        if management_scheme != "https":
            raise click.UsageError("--management-ca-file needs --management-scheme https")
        from paddler.tls import TlsError, client_context

        try:
            client_context(management_ca_file)
        except TlsError as error:
            raise click.ClickException(str(error)) from None
    require("textual", "tui", "paddler dashboard")
    from paddler.dashboard.app import DashboardApp
    from paddler.dashboard.config import DashboardConfig

    host, port = management_addr
    config = DashboardConfig(
        management_host=host,
        management_port=port,
        refresh_interval=refresh_interval,
        management_scheme=management_scheme,
        management_ca_file=management_ca_file,
    )
    DashboardApp(config).run()
