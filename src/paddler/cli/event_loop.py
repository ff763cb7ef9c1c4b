"""The one place that makes a command's event loop: uvloop by default, or asyncio's own.

``--event-loop`` (``PADDLER_EVENT_LOOP``) on ``paddler balancer``, ``agent`` and ``cluster``
chooses it; ``cluster`` passes its choice on to the balancer and agents it starts.

- ``uvloop`` (the default): libuv's loop, in C. Through a ``paddler balancer`` in front of a
  fast fake llama.cpp (``python -m bench.profile_proxy``), it cut the balancer's user-space
  instructions per small proxied request from 1,328 k to 1,188 k (-11%) and per relayed SSE
  chunk from 90 k to 54 k (-40%; callgrind's count, the ``instructions`` mode). The kernel's
  share (the socket system calls, half of a chunk's CPU) is about the same on both (16.7 and
  16.2 system calls per small request), and on the project's 2 shared cores the CPU seconds per
  request and per chunk moved less than their noise between rounds. Where uvloop cannot be imported (Windows, where it does not build, or
  a platform without a wheel), asyncio's loop runs instead and the startup line says why.
- ``asyncio``: the standard library's loop, the way out should uvloop ever misbehave somewhere:
  it has its own transports, TLS and subprocess code.

Every command logs the loop it runs on once, at startup, from inside the loop itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from paddler.config import EVENT_LOOPS

log = logging.getLogger("paddler")

T = TypeVar("T")


def loop_factory(name: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str | None]:
    """The factory of the loop ``name`` (one of ``EVENT_LOOPS``), and why another one is used
    instead, if it is (None when it is not)."""
    if name not in EVENT_LOOPS:
        raise ValueError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}")
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as error:
            return asyncio.new_event_loop, f"uvloop cannot be imported ({error})"
        return uvloop.new_event_loop, None
    return asyncio.new_event_loop, None


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.21.0`` or ``asyncio``: which loop ``loop`` is."""
    if type(loop).__module__.startswith("uvloop"):
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return "asyncio"


def run(main: Coroutine[Any, Any, T], event_loop: str, level: int = logging.INFO) -> T:
    """Run ``main`` to completion on a new loop of kind ``event_loop``, as ``asyncio.run`` does,
    and log which loop it is at ``level`` (``paddler cluster``, whose terminal shows its
    progress instead, leaves the line to the balancer and agents it starts)."""
    factory, fallback = loop_factory(event_loop)

    async def announced() -> T:
        running = describe(asyncio.get_running_loop())
        if fallback is None:
            log.log(level, "event loop: %s", running)
        else:
            log.log(level, "event loop: %s: %s", running, fallback)
        return await main

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(announced())
