"""``python -m paddler.cli.worker``: one of ``paddler balancer --workers N``'s workers.

Started by ``cli.workers`` alone, with its arguments (``WorkerArguments``) as a pickle on its
standard input: not a command for people to run.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys

from paddler.cli.process import (
    configure_logging,
    raise_open_file_limit,
    run_until_signalled,
    settle_garbage_collector,
)
from paddler.cli.workers import WorkerArguments


def main() -> None:
    arguments = pickle.load(sys.stdin.buffer)
    assert isinstance(arguments, WorkerArguments)
    configure_logging(arguments.log_level, arguments.log_format, tag=f"worker {arguments.index}")
    from paddler.balancer.fleet.remote_fleet import HostGone
    from paddler.balancer.proxy.api_keys import ApiKeys
    from paddler.balancer.service import ListenFailed
    from paddler.balancer.worker import BalancerWorker
    from paddler.telemetry import provider_from_environment

    config = arguments.config
    api_keys = ApiKeys(config.api_keys, config.api_keys_file)
    raise_open_file_limit(config.max_client_connections)
    tracer_provider = provider_from_environment(os.environ)

    async def serve(shutdown: asyncio.Event) -> None:
        worker = BalancerWorker(
            config,
            arguments.fleet_socket,
            arguments.port,
            arguments.index,
            api_keys,
            tracer_provider,
        )
        settle_garbage_collector()
        await worker.run(shutdown)

    try:
        run_until_signalled(
            serve,
            fatal=(ListenFailed, HostGone, ConnectionError, FileNotFoundError),
            on_hangup=api_keys.reload if config.api_keys_file is not None else None,
            event_loop=config.event_loop,
            second_signal_exits=False,
        )
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()


if __name__ == "__main__":
    main()
