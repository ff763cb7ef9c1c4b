"""``paddler cluster``: a whole fleet on this machine, for trying Paddler out and for demos."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from paddler.cli import event_loop
from paddler.cli.launch import checked_llamacpp_args, launch_options, require_llamacpp
from paddler.cli.options import (
    DURATION,
    PORT,
    buffer_options,
    event_loop_option,
    logging_options,
    option,
    routing_options,
)
from paddler.cli.process import configure_logging, require


@click.command()
@option(
    "--servers",
    type=click.IntRange(1, 64),
    default=2,
    help="Number of llama.cpp servers, each with its own agent.",
)
@launch_options(
    model_help="GGUF model for every server [default: a tiny model generated on first use]; "
    "the options below and any after -- are llama.cpp's.",
    threads_default=1,
)
@option("--reverseproxy-port", type=PORT, default=8086, help="Port where clients connect.")
@option("--management-port", type=PORT, default=8085, help="The balancer's management port.")
@buffer_options
@routing_options
@option(
    "--shutdown-drain-timeout",
    type=DURATION,
    default="30s",
    help="On Ctrl-C, how long requests in flight may run before the servers stop.",
)
@event_loop_option
@logging_options
def cluster(
    log_level: str,
    log_format: str,
    llamacpp_args: str,
    llamacpp_arguments: tuple[str, ...],
    **options: Any,
) -> None:
    """Start llama.cpp servers, an agent beside each and a balancer, all on this machine.

    \b
    Any llama-server option may follow --, e.g.:
      paddler cluster -- --embeddings --pooling mean
    """
    configure_logging(log_level, log_format)
    extra = checked_llamacpp_args(llamacpp_args, llamacpp_arguments)
    require_llamacpp()
    if options["model"] is None:
        require("gguf", "model", "Writing the tiny default model")
    from paddler.cluster import Cluster, ClusterConfig, ClusterFailed

    model: Path | None = options.pop("model")
    config = ClusterConfig(
        model=model, log_level=log_level, log_format=log_format, extra_args=extra, **options
    )

    async def main() -> int:
        # The first SIGINT or SIGTERM stops the cluster in order (the balancer drains first);
        # a second one cuts the drain short. The cluster's progress lines say which.
        shutdown, hurry = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (hurry if shutdown.is_set() else shutdown).set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        return await Cluster(config).run(shutdown, hurry)

    try:
        code = event_loop.run(main(), config.event_loop, level=logging.DEBUG)
    except ClusterFailed as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:  # before the handlers were installed
        code = 130
    sys.exit(code)
