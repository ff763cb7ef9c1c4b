"""The three ways a client can reach the same llama.cpp servers, started side by side.

- ``direct``: the client talks to llama.cpp itself (round robin over the servers);
- ``nginx``: a plain streaming reverse proxy, the price of any proxy hop;
- ``paddler``: the balancer with an agent beside each server.

All three run for the whole benchmark, so that each is measured against the same servers, under
the same background (the agents poll ``/slots`` throughout), in the same minute.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench.config import BenchConfig
from bench.llamacpp import Backend
from bench.nginx import running_nginx
from bench.paddler import RunningPaddler, running_paddler

BASELINE = "direct"


@dataclass(frozen=True)
class Contestant:
    name: str
    urls: tuple[str, ...]
    """Where requests go; request ``i`` goes to ``urls[i % len(urls)]``."""
    proxy_pids: tuple[int, ...] = ()
    """The proxy's processes, whose CPU time is counted (children included)."""
    paddler: RunningPaddler | None = None
    """Set for Paddler, whose buffer the benchmark watches as well."""
    fresh_connections: bool = False
    """Ask for a new connection per request (``Connection: close``) instead of reusing one.

    llama.cpp closes the connection after every streamed answer; a client that reuses it races
    that close and sometimes loses the next request ("Server disconnected"). A client that talks
    to llama.cpp directly therefore has to connect anew each time, as the proxies do on their
    side (they retry on a new connection when a pooled one turns out dead).
    """

    def url_for(self, index: int) -> str:
        return self.urls[index % len(self.urls)]


@contextlib.asynccontextmanager
async def running_contestants(
    config: BenchConfig, backends: list[Backend], workdir: Path
) -> AsyncIterator[list[Contestant]]:
    async with contextlib.AsyncExitStack() as stack:
        nginx = await stack.enter_async_context(running_nginx(backends, workdir))
        # Room for every stream: if Paddler ever holds requests back, the results show it as
        # buffered requests and as latency, never as 503s.
        buffer_size = f"--request-buffer-size={max(config.concurrency)}"
        paddler = await stack.enter_async_context(
            running_paddler(backends, config.slots, workdir, (buffer_size,))
        )
        yield [
            Contestant(
                BASELINE, tuple(backend.url for backend in backends), fresh_connections=True
            ),
            Contestant("nginx", (nginx.url,), proxy_pids=(nginx.pid,)),
            # The agents' CPU time is not counted: they poll llama.cpp at the same pace whatever
            # the traffic, for every contestant alike.
            Contestant(
                "paddler",
                (paddler.proxy_url,),
                proxy_pids=(paddler.balancer_pid,),
                paddler=paddler,
            ),
        ]
