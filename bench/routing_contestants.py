"""The five ways of spreading requests over the same llama.cpp servers, one at a time.

- ``direct``: everything to the first server, as with no balancer at all;
- ``nginx-rr``: nginx's default round robin;
- ``nginx-least-conn``: nginx's ``least_conn``, the best a load-aware generic proxy does;
- ``paddler-slots``: Paddler choosing by free slots (``--routing slots``);
- ``paddler-prefix``: Paddler choosing by cached prefix and load (``--routing prefix``).

Unlike the overhead benchmark, which keeps its contestants running side by side, each
contestant here is started for its run only, in front of servers started for that run: a
contestant must never inherit a prompt cache that another one filled.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bench.contestants import Contestant
from bench.llamacpp import Backend
from bench.nginx import running_nginx
from bench.paddler import running_paddler

CONTESTANTS = ("direct", "nginx-rr", "nginx-least-conn", "paddler-slots", "paddler-prefix")
REFERENCE = "nginx-rr"
"""What the ratios are taken against: the load balancer anyone would set up first."""
_NGINX_BALANCE = {"nginx-rr": "", "nginx-least-conn": "least_conn"}
_PADDLER_ROUTING = {"paddler-slots": "slots", "paddler-prefix": "prefix"}


@contextlib.asynccontextmanager
async def running_contestant(
    name: str,
    backends: list[Backend],
    slots: int,
    workdir: Path,
    paddler_flags: Sequence[str],
) -> AsyncIterator[Contestant]:
    """Start contestant ``name`` in front of ``backends``; stop it when the block ends.

    ``paddler_flags`` go to the balancer of both Paddler contestants, after ``--routing``.
    """
    if name == "direct":
        # llama.cpp closes the connection after every streamed answer (see Contestant).
        yield Contestant(name, (backends[0].url,), fresh_connections=True)
    elif name in _NGINX_BALANCE:
        async with running_nginx(backends, workdir, _NGINX_BALANCE[name]) as nginx:
            yield Contestant(name, (nginx.url,), proxy_pids=(nginx.pid,))
    elif name in _PADDLER_ROUTING:
        flags = (f"--routing={_PADDLER_ROUTING[name]}", *paddler_flags)
        # The agents run with their defaults, as a user's would: on this 2-core machine every
        # process beside llama.cpp takes CPU from it, so Paddler's own cost is part of the result.
        async with running_paddler(backends, slots, workdir, flags, agent_flags=()) as paddler:
            yield Contestant(
                name, (paddler.proxy_url,), proxy_pids=(paddler.balancer_pid,), paddler=paddler
            )
    else:
        raise ValueError(f"unknown contestant {name!r}; known: {', '.join(CONTESTANTS)}")
