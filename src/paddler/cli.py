"""The ``paddler`` command: ``agent``, ``balancer``, ``cluster`` and ``dashboard``.

This is the only layer that reads the environment, installs signal handlers or exits the process.
Every flag can also be set with an environment variable, named ``PADDLER_`` plus the flag in upper
case with dashes as underscores (``--request-buffer-size`` is ``PADDLER_REQUEST_BUFFER_SIZE``).
Every host flag also accepts ``aws:metadata:local-ipv4``: the EC2 instance's private address.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from paddler import __version__
from paddler.config import ROUTING_POLICIES, Address, AgentConfig, BalancerConfig, LlamaCppLaunch

log = logging.getLogger("paddler")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, with an optional unit: ``60``, ``60s``, ``500ms``, ``2m``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 60s, 500ms or 2m", param, ctx)
        return float(match.group(1)) * _UNITS[match.group(2)]


DURATION = Duration()
PORT = click.IntRange(0, 65535)


def option(*names: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option that can also be set from ``PADDLER_<NAME>``."""
    long_name = next(name for name in names if name.startswith("--")).split("/")[0]
    envvar = "PADDLER_" + long_name[2:].upper().replace("-", "_")
    kwargs.setdefault("show_default", True)
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


def _configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _resolve(host: str) -> str:
    """Resolve host lookups such as ``aws:metadata:local-ipv4`` (see ``host_resolution``)."""
    from paddler.host_resolution import AWS_METADATA_URL, HostResolutionError, resolve_host

    metadata_url = os.environ.get("PADDLER_AWS_METADATA_URL", AWS_METADATA_URL)
    try:
        return resolve_host(host, metadata_url)
    except HostResolutionError as error:
        raise click.ClickException(str(error)) from None


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(shutdown)``; SIGINT or SIGTERM sets ``shutdown``, a second one exits at once."""

    async def runner() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if shutdown.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                raise SystemExit(130)
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await main(shutdown)

    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="paddler")
def cli() -> None:
    """Paddler: a slot-aware load balancer for llama.cpp servers.

    Run `paddler cluster` for a complete local cluster, or an `agent` beside each llama.cpp
    server and one `balancer` in front of them.

    Every flag can be set with a PADDLER_* environment variable (shown in each command's --help).
    Every host flag also accepts `aws:metadata:local-ipv4`, the EC2 instance's private address.
    """


def logging_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        help="Log lines as text, or as one JSON object per line (for log shippers).",
    )(function)
    return option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        help="How much to log.",
    )(function)


# -- balancer ---------------------------------------------------------------------------------


@cli.command()
@option(
    "--management-host",
    default="127.0.0.1",
    help="Address where agents connect and the API listens.",
)
@option(
    "--management-port",
    type=PORT,
    default=8085,
    help="Port for agents and the management API (0: any free port).",
)
@option(
    "--management-token",
    default=None,
    help="Shared secret that agents must present (Bearer token). Required when the management address is not loopback. Prefer the environment variable: a command line is visible to every user of the machine.",
)
@option(
    "--management-insecure",
    is_flag=True,
    default=False,
    help="Allow a non-loopback management address without a token. Anyone who reaches it can then register backends.",
)
@option(
    "--management-dashboard-enable",
    is_flag=True,
    default=False,
    help="Serve a live web dashboard of the fleet at /dashboard on the management port (read-only, like /api/v1/agents).",
)
@option("--reverseproxy-host", default="127.0.0.1", help="Address where clients connect.")
@option(
    "--reverseproxy-port",
    type=PORT,
    default=8086,
    help="Port where clients connect (0: any free port).",
)
@option(
    "--request-buffer-size",
    type=click.IntRange(0),
    default=20,
    help="How many requests may wait for a free slot; beyond that they get 503 with Retry-After.",
)
@option(
    "--request-buffer-timeout",
    type=DURATION,
    default="60s",
    help="How long a request may wait for a free slot before it gets 504.",
)
@option(
    "--rewrite-host-header",
    is_flag=True,
    default=False,
    help="Send the agent's external host:port as the Host header instead of the client's.",
)
@option(
    "--agent-header/--no-agent-header",
    default=True,
    help="Name the agent that served each response in an X-Paddler-Agent response header.",
)
@option(
    "--max-request-body-size",
    type=click.IntRange(1),
    default=32 * 1024 * 1024,
    help="Largest request body in bytes; larger ones get 413.",
)
@option(
    "--request-body-memory",
    type=click.IntRange(1),
    default=512 * 1024 * 1024,
    help="Most bytes of request bodies held in memory at once, across all requests; beyond that requests get 503 with Retry-After.",
)
@option(
    "--agent-stale-after",
    type=DURATION,
    default="5s",
    help="Remove an agent that sent no report for this long.",
)
@option(
    "--max-retries",
    type=click.IntRange(0),
    default=2,
    help="How many other agents to try when one fails before answering.",
)
@option(
    "--circuit-breaker-cooldown",
    type=DURATION,
    default="5s",
    help="Least time a failing agent stays out of rotation; it returns with its next healthy report after that.",
)
@option(
    "--shutdown-drain-timeout",
    type=DURATION,
    default="30s",
    help="On shutdown, how long requests in flight may run before they are cut.",
)
@option(
    "--statsd-enable",
    is_flag=True,
    default=False,
    help="Send the gauges <prefix>.requests_buffered, .slots_idle and .slots_processing to a StatsD server over UDP, every second.",
)
@option("--statsd-host", default="127.0.0.1", help="Host of the StatsD server.")
@option("--statsd-port", type=PORT, default=8125, help="UDP port of the StatsD server.")
@option("--statsd-prefix", default="paddler", help="Prefix of every StatsD metric name.")
@option(
    "--autoscaling-target-utilization",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.8,
    help="Share of slots that the autoscaling advice (GET /api/v1/autoscaling on the management port) aims to keep busy.",
)
@option(
    "--routing",
    type=click.Choice(ROUTING_POLICIES),
    default="prefix",
    help="How to choose among servers with a free slot. prefix: prefer the server whose llama.cpp most likely holds the prompt's prefix in its cache, weighed against load (see docs/routing.md). slots: the server with the most free slots.",
)
@option(
    "--prefix-index-memory",
    type=click.IntRange(0),
    default=64 * 1024 * 1024,
    help="Most bytes the prefix index of --routing prefix may hold; the least recently used prefixes are forgotten first.",
)
@option(
    "--allow-unknown-models",
    is_flag=True,
    default=False,
    help="Send a request that names a model no agent serves to any agent (as a single llama.cpp would accept it) instead of answering 404.",
)
@logging_options
def balancer(log_level: str, log_format: str, **options: Any) -> None:
    """Proxy clients to llama.cpp servers with a free slot, buffering when none is free."""
    _configure_logging(log_level, log_format)
    from paddler.balancer.service import Balancer

    for key in ("management_host", "reverseproxy_host", "statsd_host"):
        options[key] = _resolve(options[key])
    config = BalancerConfig(**options)
    try:
        config.validate()
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    from paddler.telemetry import provider_from_environment

    try:
        tracer_provider = provider_from_environment(os.environ)
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    async def main(shutdown: asyncio.Event) -> None:
        await Balancer(config, tracer_provider=tracer_provider).run(shutdown)

    try:
        run_until_signalled(main)
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()  # flushes the spans still batched


# -- agent ------------------------------------------------------------------------------------


@cli.command()
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
    "--monitoring-interval",
    type=DURATION,
    default="250ms",
    help="How often to read llama.cpp's /slots; changes are reported at once.",
)
@option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Run llama.cpp on this GGUF file in a supervised child process instead of watching an external server.",
)
@option(
    "--slots",
    type=click.IntRange(1, 256),
    default=4,
    help="With --model: number of parallel slots.",
)
@option(
    "--context-size",
    type=click.IntRange(0),
    default=0,
    help="With --model: total context in tokens, shared by the slots [default: 4096 per slot].",
)
@option(
    "--threads",
    type=click.IntRange(0),
    default=0,
    help="With --model: CPU threads [default: llama.cpp's choice].",
)
@option(
    "--model-alias",
    default=None,
    help="With --model: the model name llama.cpp reports and accepts.",
)
@logging_options
def agent(
    log_level: str,
    log_format: str,
    model: Path | None,
    slots: int,
    context_size: int,
    threads: int,
    model_alias: str | None,
    **options: Any,
) -> None:
    """Watch one llama.cpp server (or run one) and report its slots to the balancer."""
    _configure_logging(log_level, log_format)
    from paddler.agent.service import Agent

    config = _agent_config(options, model, slots, context_size, threads, model_alias)

    async def main(shutdown: asyncio.Event) -> None:
        await Agent(config).run(shutdown)

    run_until_signalled(main)


def _agent_config(
    options: dict[str, Any],
    model: Path | None,
    slots: int,
    context_size: int,
    threads: int,
    model_alias: str | None,
) -> AgentConfig:
    for key in ("local_llamacpp_host", "external_llamacpp_host", "management_host"):
        options[key] = _resolve(options[key])
    local_port = options["local_llamacpp_port"]
    external_port = options["external_llamacpp_port"]
    if external_port is None:
        external_port = local_port
    if model is None and local_port == 0:
        raise click.UsageError("--local-llamacpp-port 0 only makes sense with --model")
    launch = (
        LlamaCppLaunch(
            model=model,
            slots=slots,
            context_size=context_size,
            threads=threads,
            alias=model_alias,
        )
        if model is not None
        else None
    )
    return AgentConfig(
        local=Address(options["local_llamacpp_scheme"], options["local_llamacpp_host"], local_port),
        external=Address(
            options["external_llamacpp_scheme"], options["external_llamacpp_host"], external_port
        ),
        management_host=options["management_host"],
        management_port=options["management_port"],
        management_token=options["management_token"],
        local_llamacpp_api_key=options["local_llamacpp_api_key"],
        name=options["name"],
        reporting_interval=options["reporting_interval"],
        monitoring_interval=options["monitoring_interval"],
        launch=launch,
    )


# -- cluster ----------------------------------------------------------------------------------


@cli.command()
@option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="GGUF model for every server [default: a tiny model generated on first use].",
)
@option(
    "--servers",
    type=click.IntRange(1, 64),
    default=2,
    help="Number of llama.cpp servers, each with its own agent.",
)
@option("--slots", type=click.IntRange(1, 256), default=4, help="Parallel slots per server.")
@option(
    "--threads",
    type=click.IntRange(0),
    default=1,
    help="CPU threads per server (0: llama.cpp's choice).",
)
@option("--reverseproxy-port", type=PORT, default=8086, help="Port where clients connect.")
@option("--management-port", type=PORT, default=8085, help="The balancer's management port.")
@option(
    "--request-buffer-size",
    type=click.IntRange(0),
    default=20,
    help="Requests that may wait for a slot.",
)
@option(
    "--request-buffer-timeout",
    type=DURATION,
    default="60s",
    help="How long a request may wait for a slot.",
)
@logging_options
def cluster(log_level: str, log_format: str, **options: Any) -> None:
    """Start llama.cpp servers, an agent beside each and a balancer, all on this machine."""
    _configure_logging(log_level, log_format)
    from paddler.cluster import Cluster, ClusterConfig

    config = ClusterConfig(log_level=log_level, log_format=log_format, **options)
    sys.exit(asyncio.run(Cluster(config).run_until_signalled()))


# -- dashboard --------------------------------------------------------------------------------


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    from paddler.dashboard.config import parse_host_port

    try:
        host, port = parse_host_port(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    return _resolve(host), port


@cli.command()
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
    from paddler.dashboard.app import DashboardApp
    from paddler.dashboard.config import DashboardConfig

    if refresh_interval <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--refresh-interval")
    host, port = management_addr
    config = DashboardConfig(
        management_host=host, management_port=port, refresh_interval=refresh_interval
    )
    DashboardApp(config).run()


def main() -> None:
    cli(prog_name="paddler")
