"""The fleet, served to worker processes over a Unix socket (``--workers``).

With ``--workers N``, one process (the one ``paddler balancer`` starts) holds the pool, the
buffer and the agents' sockets, and N workers serve the proxy port (``worker``). Each worker
asks this host for every reservation: one pool counts every slot and one buffer orders every
waiter, so accounting is exact and buffered requests leave in one FIFO order, whichever worker
their client reached.

Per worker connection (``_WorkerLink``), the host keeps the reservations it granted and the
requests still waiting for one. A worker that goes away (it crashed, or was killed) releases
all of them: its clients' connections to llama.cpp closed with it, so their slots settle as a
disconnected client's do (see ``agent_controller``).

Aborts (an agent reports its llama.cpp gone, or a silent server stops sending) are passed to
the worker that holds the reservation; the silent-server check reads the byte counts that
workers send once a second for their open responses (``progress``).

What happened to each request (its route, status, outcome, waits) comes back as a summary
(``forwarded_metrics``) and is counted here, so that ``/metrics``, StatsD and the dashboards
tell the whole balancer's story.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.fleet_wire import LineProtocol, WireError, agent_fields, rejection
from paddler.balancer.fleet.request_buffer import BufferRejection, RequestBuffer
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.fleet.state import health_of, model_listing
from paddler.balancer.observability.forwarded_metrics import replay
from paddler.balancer.observability.observers import Observers
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand, RoutingPolicy

log = logging.getLogger(__name__)


class Progress:
    """A remote response's byte count, as its worker last sent it (``SlotGuard.received``)."""

    __slots__ = ("total_bytes",)

    def __init__(self) -> None:
        self.total_bytes = 0


class FleetHost:
    def __init__(
        self,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        policy: RoutingPolicy,
        observers: Observers,
        path: Path,
        workers: int,
    ) -> None:
        """``policy``: what learns from the workers' cache reports; ``observers``: what counts
        their request summaries (metrics, history)."""
        self._pool = pool
        self._buffer = buffer
        self._policy = policy
        self._observers = observers
        self._path = path
        self._workers = workers
        self._links: set[_WorkerLink] = set()
        self._listening: dict[int, int] = {}
        """Which workers listen (by index), on which port."""
        self.all_listening = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._naming = pool.naming()
        pool.on_capacity(self._capacity_changed)

    @property
    def links(self) -> int:
        """Workers connected now."""
        return len(self._links)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _WorkerLink(self, self._pool, self._buffer, self._policy, self._observers),
            str(self._path),
        )

    async def drained(self, timeout: float) -> None:
        """Wait until every worker disconnected (they exit once drained), for ``timeout``."""
        async with asyncio.timeout(timeout):
            while self._links:
                await asyncio.wait(
                    [asyncio.ensure_future(link.closed) for link in list(self._links)],
                    return_when=asyncio.ALL_COMPLETED,
                )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()

    def _capacity_changed(self, _agent: object) -> None:
        naming = self._pool.naming()
        if naming is not self._naming:  # the pool makes a new one only when they change
            self._naming = naming
            for link in self._links:
                link.send_naming()

    # -- for the links ----------------------------------------------------------------------

    def joined(self, link: _WorkerLink) -> None:
        self._links.add(link)

    def left(self, link: _WorkerLink) -> None:
        self._links.discard(link)
        if link.index is not None:
            self._listening.pop(link.index, None)

    def listening(self, index: int, port: int) -> None:
        self._listening[index] = port
        if len(self._listening) >= self._workers:
            self.all_listening.set()


class _WorkerLink(LineProtocol):
    def __init__(
        self,
        host: FleetHost,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        policy: RoutingPolicy,
        observers: Observers,
    ) -> None:
        super().__init__()
        self._host = host
        self._pool = pool
        self._buffer = buffer
        self._policy = policy
        self._observers = observers
        self.index: int | None = None
        self._guards: dict[int, SlotGuard] = {}
        self._demands: dict[int, Demand] = {}
        self._waiting: dict[int, asyncio.Task[SlotGuard]] = {}
        self._handlers: dict[str, Callable[[list[Any]], None]] = {
            "acquire": self._acquire,
            "release": self._release,
            "cancel": self._cancel,
            "trip": self._on_agent(self._pool.trip),
            "failure": self._on_agent(self._pool.record_failure),
            "success": self._on_agent(self._pool.record_success),
            "lacks_route": self._on_agent(self._pool.lacks_route),
            "offers_route": self._on_agent(self._pool.offers_route),
            "learn": self._learn,
            "progress": self._progress,
            "candidates": self._candidates,
            "health": self._health,
            "listing": self._listing,
            "done": self._done,
            "unauthorized": self._unauthorized,
            "hello": self._hello,
            "listening": self._listening,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._host.joined(self)
        self.send_naming()

    def send_naming(self) -> None:
        names, ids, allow_unknown = self._pool.naming()
        self.send(["naming", sorted(names), sorted(ids), allow_unknown])

    def received(self, message: list[Any]) -> None:
        handler = self._handlers.get(message[0])
        if handler is None:
            raise WireError(f"unknown message {str(message[0])[:40]!r}")
        handler(message)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._host.left(self)
        for task in self._waiting.values():
            task.cancel()
        self._waiting.clear()
        if self._guards:
            log.warning(
                "worker %s went away with %d request(s) in flight: releasing their slots",
                self.index,
                len(self._guards),
            )
        for guard in self._guards.values():
            guard.release(abandoned=True)
        self._guards.clear()
        self._demands.clear()

    # -- reservations -----------------------------------------------------------------------

    def _acquire(self, message: list[Any]) -> None:
        _, rid, needs_slot, model, route, prompt_chars, chain, exclude, timeout = message
        demand = Demand(
            bool(needs_slot),
            None if model is None else str(model),
            None if route is None else str(route),
            int(prompt_chars),
            tuple(int(link) for link in chain),
            frozenset(str(agent) for agent in exclude),
        )
        rid = int(rid)
        try:
            guard = self._buffer.acquire_now(demand)
        except BufferRejection as error:
            self.send(["rejected", rid, *rejection(error)])
            return
        if guard is not None:
            self._grant(rid, guard, demand)
            return
        deadline = self._loop.time() + float(timeout)
        task = self._loop.create_task(self._buffer.wait(demand, deadline=deadline))
        self._waiting[rid] = task
        task.add_done_callback(lambda done: self._waited(rid, demand, done))

    def _waited(self, rid: int, demand: Demand, task: asyncio.Task[SlotGuard]) -> None:
        if self._waiting.pop(rid, None) is None or task.cancelled():
            return
        error = task.exception()
        if error is None:
            self._grant(rid, task.result(), demand)
        elif isinstance(error, BufferRejection):
            self.send(["rejected", rid, *rejection(error)])
        else:
            log.error("worker %s: a reservation failed: %r", self.index, error)
            self.send(["rejected", rid, "no_candidates", f"the balancer failed: {error}"])

    def _grant(self, rid: int, guard: SlotGuard, demand: Demand) -> None:
        if self.transport is None or self.transport.is_closing():
            guard.release()
            return
        self._guards[rid] = guard
        self._demands[rid] = demand
        guard.received = Progress()
        guard.on_abort(lambda reason: self.send(["abort", rid, reason]))
        self.send(["granted", rid, agent_fields(guard.agent), guard.holds_slot])

    def _release(self, message: list[Any]) -> None:
        rid = int(message[1])
        guard = self._guards.pop(rid, None)
        self._demands.pop(rid, None)
        if guard is not None:
            guard.release(abandoned=bool(message[2]))

    def _cancel(self, message: list[Any]) -> None:
        """The worker's request went away before its reservation arrived."""
        rid = int(message[1])
        task = self._waiting.pop(rid, None)
        if task is not None:
            task.cancel()
            return
        guard = self._guards.pop(rid, None)
        self._demands.pop(rid, None)
        if guard is not None:
            guard.release()

    def _learn(self, message: list[Any]) -> None:
        rid, cached, computed, seconds = message[1:]
        guard, demand = self._guards.get(int(rid)), self._demands.get(int(rid))
        if guard is not None and demand is not None:
            report = CacheReport(int(cached), int(computed), float(seconds))
            self._policy.learn(guard.agent, demand, report)

    def _progress(self, message: list[Any]) -> None:
        for rid, total in message[1]:
            guard = self._guards.get(int(rid))
            if guard is not None and isinstance(guard.received, Progress):
                guard.received.total_bytes = int(total)

    def _on_agent(self, action: Callable[..., None]) -> Callable[[list[Any]], None]:
        def handle(message: list[Any]) -> None:
            agent = self._pool.at(str(message[1]))
            if agent is not None:  # gone since: nothing to count against it
                action(agent, *(str(argument) for argument in message[2:]))

        return handle

    # -- questions --------------------------------------------------------------------------

    def _candidates(self, message: list[Any]) -> None:
        _, qid, exclude, model, route = message
        found = self._pool.has_candidates(
            [str(agent) for agent in exclude],
            None if model is None else str(model),
            None if route is None else str(route),
        )
        self.send(["answer", int(qid), found])

    def _health(self, message: list[Any]) -> None:
        self.send(["answer", int(message[1]), list(health_of(self._pool, self._buffer))])

    def _listing(self, message: list[Any]) -> None:
        self.send(["answer", int(message[1]), model_listing(self._pool)])

    # -- the workers' own news --------------------------------------------------------------

    def _done(self, message: list[Any]) -> None:
        replay(self._observers, message[1])

    def _unauthorized(self, message: list[Any]) -> None:
        self._observers.unauthorized(str(message[1]))

    def _hello(self, message: list[Any]) -> None:
        self.index = int(message[1])

    def _listening(self, message: list[Any]) -> None:
        if self.index is None:
            raise WireError("listening before hello")
        self._host.listening(self.index, int(message[1]))
