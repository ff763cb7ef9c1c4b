"""The wire between a worker and its fleet host (``--workers``): JSON lines on a Unix socket.

Each message is one JSON array, ``[kind, ...]``, on one line. The socket lives in a directory
only the balancer's user can enter (see ``cli.workers``), so both ends are the same program; a
message that does not parse or does not fit is still a bug to survive, not to trust: the
connection is closed (the worker is restarted, and its reservations released).

Why hand-written: a small request costs two messages each way (reserve, then release with its
summary), so the framing sits on the per-request path. ``asyncio.Protocol`` with one write per
loop iteration (messages written in the same iteration go out in one system call) keeps it to a
few microseconds; asyncio streams would add a task switch per message. The encoding is
``orjson``'s: 0.2-0.7 µs a message where the standard library's ``json`` took 2-3 µs (four
messages a request, each end encoding or decoding each). ``python -m bench.fleet_link_costs``
measures what a reservation over the socket costs; docs/benchmarks.md (section workers) has
the figures.

Agents travel as ``[id, name, scheme, host, port]``; the worker keeps a copy of each (see
``agent_mirror``). Rejections travel as ``[kind, message, ...]`` (see ``rejection`` and
``raise_rejection``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import orjson

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.request_buffer import (
    BufferFull,
    BufferRejection,
    BufferTimeout,
    NoCandidates,
    ShuttingDown,
    UnknownModel,
)

log = logging.getLogger(__name__)

MAX_LINE = 8 * 1024 * 1024
"""The longest message: a summary batch or a model listing of a large fleet fits many times."""


class WireError(Exception):
    """A message that does not parse or does not fit."""


class LineProtocol(asyncio.Protocol):
    """Both ends' framing: ``send`` messages, ``received`` each one that arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._incoming = bytearray()
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, message: list[Any]) -> None:
        """Queue ``message``; what is queued in one loop iteration leaves in one write."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(orjson.dumps(message))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.transport is not None and not self.transport.is_closing():
            pending.append(b"")
            self.transport.write(b"\n".join(pending))

    def data_received(self, data: bytes) -> None:
        incoming = self._incoming
        incoming += data
        start = 0
        try:
            while (end := incoming.find(b"\n", start)) >= 0:
                line = incoming[start:end]
                start = end + 1
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    raise WireError(f"not JSON: {error}") from None
                if not isinstance(message, list) or not message:
                    raise WireError("a message is a non-empty JSON array")
                self.received(message)
            del incoming[:start]
            if len(incoming) > MAX_LINE:
                raise WireError(f"a message longer than {MAX_LINE} bytes")
        except (WireError, TypeError, ValueError, KeyError, IndexError) as error:
            log.error("fleet link: closing on a bad message: %s", error)
            self._incoming.clear()
            assert self.transport is not None
            self.transport.close()

    def received(self, message: list[Any]) -> None:
        """One message; raise ``WireError`` (or TypeError, ValueError...) for a malformed one."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()


def agent_fields(agent: AgentController) -> list[Any]:
    address = agent.address
    return [agent.id, agent.name, address.scheme, address.host, address.port]


def rejection(error: BufferRejection) -> list[Any]:
    if isinstance(error, UnknownModel):
        return ["unknown_model", str(error), error.model, error.served]
    return [_KINDS.get(type(error), "no_candidates"), str(error)]


def raise_rejection(fields: list[Any]) -> None:
    kind, message = fields[0], str(fields[1])
    if kind == "unknown_model":
        raise UnknownModel(str(fields[2]), [str(name) for name in fields[3]])
    raise _TYPES.get(kind, NoCandidates)(message)


_KINDS: dict[type[BufferRejection], str] = {
    BufferFull: "buffer_full",
    BufferTimeout: "buffer_timeout",
    NoCandidates: "no_candidates",
    ShuttingDown: "shutting_down",
}
_TYPES = {kind: error for error, kind in _KINDS.items()}
