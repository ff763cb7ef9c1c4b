"""``--state redis://``: this balancer's side of a fleet shared through Redis (docs/ha.md).

``running_shared_fleet`` connects to Redis (and refuses to start when it cannot), names this
replica, and runs the two parts for as long as the balancer runs: the ``RedisFleet`` its proxy
asks for every slot, and the ``RedisPublisher`` that writes the agents reporting here to the
shared membership. The balancer listens only once the fleet has been read whole, so that its
first request sees every server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.redis_fleet import RedisFleet
from paddler.balancer.fleet.redis_leases import RedisLeases
from paddler.balancer.fleet.redis_publisher import RedisPublisher
from paddler.balancer.fleet.redis_registry import RedisRegistry
from paddler.config import BalancerConfig

FLEET = "paddler"
"""The prefix of every key (one fleet per Redis database: give each fleet its own ``/DB``)."""

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 5.0
"""A Redis that stops answering fails a request's reservation after this long (a 503), rather
than holding it."""

HEALTH_CHECK_INTERVAL = 5.0

FOLLOW_TIMEOUT = 10.0
"""How long the start waits for the fleet's membership to be read whole."""


class StateUnavailable(Exception):
    """The shared state could not be reached when the balancer started."""


@dataclass(frozen=True)
class SharedFleet:
    fleet: RedisFleet
    replica: str


def redacted(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def replica_name() -> str:
    """This balancer's name among the replicas: its host, its process and a random part (a
    restarted balancer is another replica: its predecessor's leases are not its own)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@contextlib.asynccontextmanager
async def running_shared_fleet(
    config: BalancerConfig, pool: AgentControllerPool
) -> AsyncIterator[SharedFleet]:
    client = Redis.from_url(
        config.state, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT
    )
    # Subscriptions wait for messages as long as there are none: no read timeout, but a PING
    # when a connection has been quiet this long, so that a Redis gone silent is noticed.
    subscriber = Redis.from_url(
        config.state,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.ping()
        except (RedisError, OSError, TimeoutError) as error:
            raise StateUnavailable(
                f"cannot reach the shared state at {redacted(config.state)}: "
                f"{error or type(error).__name__}"
            ) from None
        replica = replica_name()
        fleet = RedisFleet(
            client,
            fleet=FLEET,
            replica=replica,
            buffer_timeout=config.request_buffer_timeout,
            stale_after=config.agent_stale_after,
            lease_timeout=config.lease_timeout,
            allow_unknown_models=config.allow_unknown_models,
            failure_threshold=config.circuit_breaker_failure_threshold,
            circuit_cooldown=config.circuit_breaker_cooldown,
            subscriber=subscriber,
        )
        registry = RedisRegistry(
            client, FLEET, replica=replica, stale_after=config.agent_stale_after
        )
        leases = RedisLeases(client, FLEET, replica=replica, lease_timeout=config.lease_timeout)
        publisher = RedisPublisher(pool, registry, leases, config.agent_stale_after)
        tasks = [
            asyncio.create_task(fleet.run(stop), name="shared fleet"),
            asyncio.create_task(publisher.run(stop), name="shared fleet's publisher"),
        ]
        try:
            async with asyncio.timeout(FOLLOW_TIMEOUT):
                await fleet.followed.wait()
        except TimeoutError:
            raise StateUnavailable(
                f"could not read the fleet from {redacted(config.state)} within {FOLLOW_TIMEOUT:g}s"
            ) from None
        yield SharedFleet(fleet, replica)
    finally:
        stop.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await subscriber.aclose()
