"""``paddler agent``: watch one llama.cpp server (or run one) and report it to the balancer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from paddler.cli.launch import checked_llamacpp_args, launch_options, require_llamacpp
from paddler.cli.options import (
    DURATION,
    PORT,
    READABLE_FILE,
    event_loop_option,
    logging_options,
    option,
)
from paddler.cli.process import configure_logging, resolve_host, run_until_signalled
from paddler.config import Address, AgentConfig, LlamaCppLaunch, parse_host_port


@click.command()
@option(
    "--local-llamacpp-host", default="127.0.0.1", help="Host where this agent reaches llama.cpp."
)
@option(
    "--local-llamacpp-port",
    type=PORT,
    default=8088,
    help="Port where this agent reaches llama.cpp (with --model, 0 picks a free port).",
)
@option(
    "--local-llamacpp-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="Scheme this agent uses to reach llama.cpp.",
)
@option(
    "--local-llamacpp-api-key",
    default=None,
    help="llama.cpp's API key, needed for /slots and /props when llama.cpp has one (with --model, llama.cpp is started with it). Prefer the environment variable.",
)
@option(
    "--external-llamacpp-host",
    default="127.0.0.1",
    help="Host where the balancer reaches llama.cpp.",
)
@option(
    "--external-llamacpp-port",
    type=PORT,
    default=None,
    help="Port where the balancer reaches llama.cpp [default: the local port].",
)
@option(
    "--external-llamacpp-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="Scheme the balancer uses to reach llama.cpp.",
)
@option("--management-host", default="127.0.0.1", help="Host of the balancer's management port.")
@option("--management-port", type=PORT, default=8085, help="The balancer's management port.")
@option(
    "--management-addr",
    "management_addrs",
    multiple=True,
    metavar="HOST:PORT",
    help="A balancer's management address ([HOST]:PORT for IPv6), instead of "
    "--management-host and --management-port; repeat it for several balancers: the agent links "
    "to one at a time, the first that answers, and to the next when that link breaks "
    "(docs/ha.md). The environment variable takes them separated by spaces.",
)
@option(
    "--management-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="https: reach the management port over TLS (wss://), verifying its certificate "
    "against --management-ca-file.",
)
@option(
    "--management-ca-file",
    type=READABLE_FILE,
    default=None,
    help="PEM file of the CA(s) that signed the balancer's management certificate, for "
    "--management-scheme https [default: the system's trust store].",
)
@option(
    "--management-token",
    default=None,
    help="Shared secret to present to the balancer. Prefer the environment variable: a command line is visible to every user of the machine.",
)
@option("--name", default="", help="Name shown in the balancer [default: hostname:external port].")
@option(
    "--reporting-interval",
    type=DURATION,
    default="1s",
    help="Report at least this often, even when nothing changed.",
)
@option(
    "--agent-reporting-interval-miliseconds",
    type=click.IntRange(1),
    default=None,
    help="The original Paddler's spelling of --reporting-interval, in milliseconds.",
)
@option(
    "--monitoring-interval",
    type=DURATION,
    default="250ms",
    help="How often to read llama.cpp's /slots; changes are reported at once.",
)
@option(
    "--shutdown-drain-timeout",
    type=DURATION,
    default="30s",
    help="With --model, on shutdown: after deregistering, how long requests still running on "
    "llama.cpp may take to finish before it stops.",
)
@launch_options(
    model_help="Run llama.cpp on this GGUF file in a supervised child process instead of "
    "watching an external server; the options below and any after -- are llama.cpp's.",
    threads_default=0,
)
@event_loop_option
@logging_options
def agent(
    log_level: str,
    log_format: str,
    model: Path | None,
    slots: int,
    context_size: int,
    threads: int,
    model_alias: str | None,
    llamacpp_args: str,
    llamacpp_arguments: tuple[str, ...],
    agent_reporting_interval_miliseconds: int | None,
    **options: Any,
) -> None:
    """Watch one llama.cpp server (or run one) and report its slots to the balancer.

    \b
    With --model, any llama-server option may follow --, e.g.:
      paddler agent --model m.gguf --slots 4 -- --embeddings --pooling mean
    """
    configure_logging(log_level, log_format)
    extra = checked_llamacpp_args(llamacpp_args, llamacpp_arguments)
    if model is None and extra:
        raise click.UsageError("llama.cpp options (after -- or --llamacpp-args) need --model")
    if model is not None:
        require_llamacpp()
    if agent_reporting_interval_miliseconds is not None:
        options["reporting_interval"] = agent_reporting_interval_miliseconds / 1000
    launch = (
        LlamaCppLaunch(
            model=model,
            slots=slots,
            context_size=context_size,
            threads=threads,
            alias=model_alias,
            extra_args=extra,
        )
        if model is not None
        else None
    )
    config = _agent_config(options, launch)
    from paddler.agent.llamacpp_process import LlamaCppGaveUp
    from paddler.agent.service import Agent

    async def main(shutdown: asyncio.Event) -> None:
        await Agent(config).run(shutdown)

    run_until_signalled(main, fatal=(LlamaCppGaveUp,), event_loop=config.event_loop)


def _balancers(texts: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """``--management-addr``'s values, parsed and resolved; refused alongside
    ``--management-host`` or ``--management-port``."""
    if not texts:
        return ()
    context = click.get_current_context()
    for name in ("management_host", "management_port"):
        source = context.get_parameter_source(name)
        if source not in (None, click.core.ParameterSource.DEFAULT):
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"give --management-addr or {flag}, not both")
    balancers = []
    for text in texts:
        try:
            host, port = parse_host_port(text)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--management-addr") from None
        if (address := (resolve_host(host), port)) not in balancers:
            balancers.append(address)
    return tuple(balancers)


def _agent_config(options: dict[str, Any], launch: LlamaCppLaunch | None) -> AgentConfig:
    for key in ("local_llamacpp_host", "external_llamacpp_host", "management_host"):
        options[key] = resolve_host(options[key])
    balancers = _balancers(options["management_addrs"])
    if balancers:
        options["management_host"], options["management_port"] = balancers[0]
    local_port = options["local_llamacpp_port"]
    external_port = options["external_llamacpp_port"]
    if external_port is None:
        external_port = local_port
    if launch is None and local_port == 0:
        raise click.UsageError("--local-llamacpp-port 0 only makes sense with --model")
    if options["management_ca_file"] is not None:
        if options["management_scheme"] != "https":
            raise click.UsageError("--management-ca-file needs --management-scheme https")
        from paddler.tls import TlsError, client_context

        try:
            client_context(options["management_ca_file"])
        except TlsError as error:
            raise click.ClickException(str(error)) from None
    return AgentConfig(
        local=Address(options["local_llamacpp_scheme"], options["local_llamacpp_host"], local_port),
        external=Address(
            options["external_llamacpp_scheme"], options["external_llamacpp_host"], external_port
        ),
        management_host=options["management_host"],
        management_port=options["management_port"],
        management_addresses=balancers,
        management_scheme=options["management_scheme"],
        management_token=options["management_token"],
        management_ca_file=options["management_ca_file"],
        local_llamacpp_api_key=options["local_llamacpp_api_key"],
        name=options["name"],
        reporting_interval=options["reporting_interval"],
        monitoring_interval=options["monitoring_interval"],
        shutdown_drain_timeout=options["shutdown_drain_timeout"],
        launch=launch,
        event_loop=options["event_loop"],
    )
