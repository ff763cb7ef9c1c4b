"""``paddler balancer``: the proxy port for clients and the management port for agents."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

import click

from paddler.cli.options import (
    COMMA_SEPARATED,
    DURATION,
    PORT,
    READABLE_FILE,
    buffer_options,
    event_loop_option,
    flag,
    logging_options,
    option,
    routing_options,
)
from paddler.cli.process import (
    configure_logging,
    notify,
    raise_open_file_limit,
    resolve_host,
    run_until_signalled,
    settle_garbage_collector,
)
from paddler.config import MAX_WORKERS, PROXY_SERVERS, UPSTREAM_CLIENTS, BalancerConfig


@click.command()
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
@flag(
    "--management-insecure",
    default=False,
    help="Allow a non-loopback management address without a token. Anyone who reaches it can then register backends.",
)
@flag(
    "--management-dashboard-enable",
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
@buffer_options
@flag(
    "--rewrite-host-header",
    default=False,
    help="Send the agent's external host:port as the Host header instead of the client's.",
)
@flag(
    "--agent-header",
    default=True,
    negative="--no-agent-header",
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
    "--upstream-read-timeout",
    type=DURATION,
    default="10m",
    help="Longest a llama.cpp server may send nothing: before the response headers, and then "
    "between chunks. A server silent for longer is taken out of rotation; a request that got "
    "no headers goes to another server, a stream ends with an error event. Keep it generous: "
    "llama.cpp sends the headers of a stream only after the prompt is processed (a long prompt "
    "on a CPU can take minutes), and those of a non-streamed answer only once it is complete. "
    "A frozen server is usually caught sooner, by its agent's report.",
)
@option(
    "--upstream-client",
    type=click.Choice(UPSTREAM_CLIENTS),
    default="httptools",
    help="The HTTP client that relays requests to llama.cpp: httptools, a small hand-written "
    "one (a quarter fewer instructions per request and a third fewer per streamed chunk than "
    "the balancer spends with aiohttp's, docs/benchmarks.md), or aiohttp's ClientSession.",
)
@option(
    "--proxy-server",
    type=click.Choice(PROXY_SERVERS),
    default="httptools",
    help="The HTTP server of the proxy port (the management port is always aiohttp's): "
    "httptools, a small hand-written one (a sixth fewer instructions per request and a quarter "
    "fewer per streamed chunk than the balancer spends with aiohttp's, docs/benchmarks.md), or "
    "aiohttp's web server.",
)
@option(
    "--shutdown-drain-timeout",
    type=DURATION,
    default="30s",
    help="On shutdown, how long requests in flight may run before they are cut.",
)
@flag(
    "--statsd-enable",
    default=False,
    help="Send the gauges <prefix>.requests_buffered, .slots_idle and .slots_processing to a StatsD server over UDP, every second.",
)
@option("--statsd-host", default="127.0.0.1", help="Host of the StatsD server.")
@option("--statsd-port", type=PORT, default=8125, help="UDP port of the StatsD server.")
@option("--statsd-prefix", default="paddler", help="Prefix of every StatsD metric name.")
@option(
    "--statsd-scheme",
    type=click.Choice(["http", "udp"]),
    default="http",
    help="Accepted for the original Paddler's commands: StatsD always goes over UDP.",
)
@option(
    "--management-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="Scheme of the management port (the original Paddler's flag); https needs "
    "--management-tls-cert, which turns TLS on by itself.",
)
@option(
    "--reverseproxy-scheme",
    type=click.Choice(["http", "https"]),
    default="http",
    help="Scheme of the proxy port (the original Paddler's flag); https needs "
    "--reverseproxy-tls-cert, which turns TLS on by itself.",
)
@option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="KEY",
    type=COMMA_SEPARATED,
    envvar="PADDLER_API_KEYS",
    help="A client API key: every request on the proxy port but /health (and CORS preflights) must then present "
    "one, as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY', or get 401 (repeatable; the "
    "variable takes several, between commas). Prefer the variable or --api-keys-file: a "
    "command line is visible to every user of the machine.",
)
@option(
    "--api-keys-file",
    type=READABLE_FILE,
    default=None,
    help="A file of client API keys, one per line ('NAME: KEY' names one; blank lines and # "
    "comments are ignored), re-read on SIGHUP. Turns client keys on, as --api-key does.",
)
@option(
    "--llamacpp-api-key",
    default=None,
    help="API key of the llama.cpp servers; the balancer sends it to them (replacing the client's), and uses it to read their /props.",
)
@option(
    "--reverseproxy-tls-cert",
    type=READABLE_FILE,
    default=None,
    help="PEM certificate (with its chain) of the proxy port, which then speaks only HTTPS; "
    "needs --reverseproxy-tls-key.",
)
@option(
    "--reverseproxy-tls-key",
    type=READABLE_FILE,
    default=None,
    help="PEM private key of --reverseproxy-tls-cert.",
)
@option(
    "--management-tls-cert",
    type=READABLE_FILE,
    default=None,
    help="PEM certificate (with its chain) of the management port, which then speaks only "
    "HTTPS and WSS; needs --management-tls-key.",
)
@option(
    "--management-tls-key",
    type=READABLE_FILE,
    default=None,
    help="PEM private key of --management-tls-cert.",
)
@option(
    "--client-header-timeout",
    type=DURATION,
    default="10s",
    help="Close a client connection whose request head has not arrived this long after the connection opened (after the TLS handshake, which has as long again), or, on a kept-alive connection, after the first byte of the next request. Applies to both ports; a request being answered, a stream or an agent's WebSocket is never cut.",
)
@option(
    "--client-body-timeout",
    type=DURATION,
    default="30s",
    help="Answer 408 to a request whose body sends nothing for this long between two chunks.",
)
@option(
    "--client-keepalive-timeout",
    type=DURATION,
    default="75s",
    help="Close a kept-alive client connection (either port) that starts no new request for this long.",
)
@option(
    "--max-client-connections",
    type=click.IntRange(1),
    default=2048,
    help="Most client connections open on the proxy port at once; past it, a new connection is answered 503 with Connection: close. The balancer raises its open-file limit (RLIMIT_NOFILE) to the hard limit, so that this cap, not running out of file descriptors, is what bites; keep the hard limit (ulimit -Hn) above this plus the agents and upstream connections.",
)
@option(
    "--autoscaling-target-utilization",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.8,
    help="Share of slots that the autoscaling advice (GET /api/v1/autoscaling on the management port) aims to keep busy.",
)
@option(
    "--max-agents",
    type=click.IntRange(1),
    default=1024,
    help="Most agents the balancer tracks at once; a registration past it is refused with an error the agent logs. The management port accepts this many connections plus 256 (the API, dashboards and reconnecting agents).",
)
@option(
    "--max-slots-per-agent",
    type=click.IntRange(1),
    default=256,
    help="Most slots counted for one llama.cpp server whose /props the balancer cannot read; otherwise its /props total_slots bounds them.",
)
@option(
    "--workers",
    type=click.IntRange(1, MAX_WORKERS),
    default=1,
    help="Processes that serve the proxy port, all on the same port (SO_REUSEPORT): one per "
    "core uses every core of the host. With more than 1, this process holds the fleet (agents, "
    "slots, the buffer, the management port) and the workers ask it for every slot over a Unix "
    "socket, so slot accounting stays exact; --max-client-connections and "
    "--request-body-memory are shared out among them.",
)
@option(
    "--state",
    default="memory://",
    metavar="URL",
    help="Where the fleet's state lives: memory:// keeps it in this process; a Redis URL "
    "(redis://HOST:PORT/DB, rediss:// for TLS, unix:///PATH) shares one fleet between every "
    "balancer given the same URL: reservations, the buffer's queue and the fleet's members "
    "(docs/ha.md). Put credentials in the environment variable, not on the command line.",
)
@option(
    "--lease-timeout",
    type=DURATION,
    default="10s",
    help="With a Redis --state: how long a balancer's reservations outlive it (kill -9, a "
    "network cut) before their slots return to the fleet.",
)
@routing_options
@event_loop_option
@logging_options
def balancer(
    log_level: str,
    log_format: str,
    statsd_scheme: str,
    management_scheme: str,
    reverseproxy_scheme: str,
    **options: Any,
) -> None:
    """Proxy clients to llama.cpp servers with a free slot, buffering when none is free."""
    configure_logging(log_level, log_format)
    from paddler.balancer.fleet.shared_state import StateUnavailable
    from paddler.balancer.proxy.api_keys import ApiKeyError, ApiKeys
    from paddler.balancer.service import Balancer, ListenFailed, server_tls
    from paddler.tls import TlsError

    for key in ("management_host", "reverseproxy_host", "statsd_host"):
        options[key] = resolve_host(options[key])
    options["api_keys"] = tuple(options["api_keys"])
    config = BalancerConfig(**options)
    try:
        config.validate()
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    for port, scheme in (("management", management_scheme), ("reverseproxy", reverseproxy_scheme)):
        if scheme == "https" and getattr(config, f"{port}_tls_cert") is None:
            raise click.UsageError(
                f"--{port}-scheme https needs --{port}-tls-cert and --{port}-tls-key"
            )
    try:
        api_keys = ApiKeys(config.api_keys, config.api_keys_file)
        server_tls(config)  # fails here, in one line, if a certificate or key is unusable
    except (ApiKeyError, TlsError) as error:
        raise click.ClickException(str(error)) from None

    raise_open_file_limit(config.max_client_connections + config.max_agents)
    from paddler.telemetry import provider_from_environment

    try:
        tracer_provider = provider_from_environment(os.environ)
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    from paddler.cli.workers import FleetSocketDirectory, WorkerProcesses, WorkersFailed

    directory = FleetSocketDirectory() if config.workers > 1 else None
    processes = (
        None
        if directory is None
        else WorkerProcesses(config, directory.socket, log_level, log_format)
    )

    async def main(shutdown: asyncio.Event) -> None:
        try:
            await serve(shutdown)
        except BaseExceptionGroup as group:
            # A task group's one failure (a port taken, workers that cannot start) is told as
            # itself, so that it ends the process with its message rather than a traceback.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def serve(shutdown: asyncio.Event) -> None:
        service = Balancer(
            config,
            tracer_provider=tracer_provider,
            api_keys=api_keys,
            fleet_socket=None if directory is None else directory.socket,
        )
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(service.run(shutdown))
            if processes is not None:
                await _first(service.proxy_port_bound.wait(), running)
                if service.proxy_port_bound.is_set():
                    assert service.reverseproxy_port is not None
                    tasks.create_task(processes.run(service.reverseproxy_port, shutdown))
            if await _first(service.ready.wait(), running):
                if processes is not None:
                    processes.ever_listened = True
                settle_garbage_collector()
                notify(
                    f"READY=1\nSTATUS=proxy on port {service.reverseproxy_port}, "
                    f"management on port {service.management_port}"
                )
            try:
                await running
            finally:
                notify("STOPPING=1")

    def hang_up() -> None:
        if config.api_keys_file is not None:
            api_keys.reload()
        if processes is not None:
            processes.hang_up()

    try:
        run_until_signalled(
            main,
            fatal=(ListenFailed, WorkersFailed, StateUnavailable),
            on_hangup=hang_up if config.api_keys_file is not None or processes else None,
            event_loop=config.event_loop,
        )
    finally:
        if directory is not None:
            directory.remove()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # flushes the spans still batched


async def _first(waited: Coroutine[Any, Any, object], running: asyncio.Task[None]) -> bool:
    """Wait for ``waited`` or for ``running`` to end; whether ``waited`` came first."""
    waiting = asyncio.ensure_future(waited)
    await asyncio.wait({waiting, running}, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done():
        return True
    waiting.cancel()
    return False
