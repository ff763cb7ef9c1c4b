"""A worker's fleet: the fleet host's pool and buffer, over its Unix socket (``--workers``).

Implements ``fleet.Fleet`` for the proxy of a worker process. A reservation is asked of the
host (``acquire``) and given back when the request ends (its ``SlotGuard`` sends ``release``),
so the host's pool counts every worker's requests; a request that goes away while it waits
sends ``cancel``. What servers did (trips, failures, successes, routes, cache reports) is sent
as it happens; ``/health``, ``/v1/models`` and the retry question are asked and awaited.

The names the fleet answers to (for ``accepts``) are pushed by the host whenever they change,
so that the refusal of an unknown model costs no round trip.

If the host goes away, nothing more can be served: every waiting request is answered
``ShuttingDown`` and ``run`` returns, which ends the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import Naming, accepts
from paddler.balancer.fleet.agent_mirror import AgentMirrors
from paddler.balancer.fleet.fleet_wire import LineProtocol, WireError, raise_rejection
from paddler.balancer.fleet.request_buffer import ShuttingDown
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.fleet.state import FleetHealth
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand
from paddler.lifecycle import wait_or_shutdown

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
"""How often the open responses' byte counts go to the host (for ``silent_servers``)."""


CONNECT_TIMEOUT = 10.0
"""How long a new worker waits for the fleet host's first message."""


class HostGone(Exception):
    """The fleet host closed the link."""


class RemoteGuard(SlotGuard):
    __slots__ = ("rid",)

    rid: int


class RemoteFleet(LineProtocol):
    def __init__(self, buffer_timeout: float, index: int) -> None:
        super().__init__()
        self._buffer_timeout = buffer_timeout
        self._index = index
        self._rids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[list[Any]]] = {}
        """Reservations and questions waiting for their answer, by id."""
        self._guards: dict[int, RemoteGuard] = {}
        self._reported: dict[int, int] = {}
        """Each open response's byte count as last sent."""
        self._mirrors = AgentMirrors()
        self._naming = Naming(frozenset(), frozenset(), False)
        self._named = self._loop.create_future()
        self._leaving = False

    @classmethod
    async def connect(cls, path: Path, buffer_timeout: float, index: int) -> RemoteFleet:
        """Connect to the host at ``path`` and wait for the fleet's names."""
        loop = asyncio.get_running_loop()
        _, fleet = await loop.create_unix_connection(lambda: cls(buffer_timeout, index), str(path))
        fleet.send(["hello", index])
        await asyncio.wait(
            [fleet._named, fleet.closed],
            timeout=CONNECT_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not fleet._named.done():
            fleet.disconnect()
            raise HostGone(f"the fleet host at {path} did not answer")
        return fleet

    async def run(self, shutdown: asyncio.Event) -> None:
        """Send the open responses' progress until shutdown or until the host goes."""
        while not await wait_or_shutdown(shutdown, PROGRESS_INTERVAL):
            if self.closed.done():
                return
            self._send_progress()

    def listening(self, port: int) -> None:
        self.send(["listening", port])

    # -- the wire ---------------------------------------------------------------------------

    def received(self, message: list[Any]) -> None:
        kind = message[0]
        if kind in ("granted", "rejected", "answer"):
            future = self._asked.pop(int(message[1]), None)
            if future is not None and not future.done():
                future.set_result(message)
            elif kind == "granted":
                # Its request went away meanwhile (a cancel crossed the grant): give it back.
                self.send(["cancel", int(message[1])])
        elif kind == "abort":
            guard = self._guards.get(int(message[1]))
            if guard is not None:
                guard.abort(str(message[2]))
        elif kind == "naming":
            self._naming = Naming(
                frozenset(str(name) for name in message[1]),
                frozenset(str(model) for model in message[2]),
                bool(message[3]),
            )
            if not self._named.done():
                self._named.set_result(None)
        else:
            raise WireError(f"unknown message {str(kind)[:40]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._leaving:
            log.warning("the fleet host closed the link: this worker stops")
        for future in self._asked.values():
            if not future.done():
                future.set_exception(ShuttingDown("the balancer is shutting down"))
        self._asked.clear()

    async def _ask(self, message: list[Any]) -> list[Any]:
        if self.closed.done():
            raise ShuttingDown("the balancer is shutting down")
        qid = next(self._rids)
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self._asked[qid] = future
        self.send([message[0], qid, *message[1:]])
        return await future

    # -- fleet.Fleet ------------------------------------------------------------------------

    @property
    def buffer_timeout(self) -> float:
        return self._buffer_timeout

    def accepts(self, model: str) -> bool:
        return accepts(model, self._naming)

    def model_ids(self) -> list[str]:
        return sorted(self._naming.ids)

    def acquire_now(self, demand: Demand) -> SlotGuard | None:
        """Never at once: every reservation is the host's to make."""
        if self.closed.done():
            raise ShuttingDown("the balancer is shutting down")
        return None

    def wait(self, demand: Demand, deadline: float) -> Coroutine[Any, Any, SlotGuard]:
        return self.acquire(demand, deadline)

    async def acquire(self, demand: Demand, deadline: float) -> SlotGuard:
        if self.closed.done():
            raise ShuttingDown("the balancer is shutting down")
        rid = next(self._rids)
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self._asked[rid] = future
        self.send(
            [
                "acquire",
                rid,
                demand.needs_slot,
                demand.model,
                demand.route,
                demand.prompt_chars,
                demand.chain,
                sorted(demand.exclude),
                max(0.0, deadline - self._loop.time()),
            ]
        )
        try:
            answer = await future
        except asyncio.CancelledError:
            if self._asked.pop(rid, None) is not None:
                self.send(["cancel", rid])
            elif future.done() and not future.cancelled() and future.exception() is None:
                self._give_back(rid, future.result())
            raise
        if answer[0] == "rejected":
            raise_rejection(answer[2:])
        agent = self._mirrors.get(answer[2])
        guard = RemoteGuard(agent, bool(answer[3]), self._loop.time(), self._released)
        guard.rid = rid
        self._guards[rid] = guard
        agent.guards.add(guard)
        return guard

    def _give_back(self, rid: int, answer: list[Any]) -> None:
        if answer[0] == "granted":
            self.send(["cancel", rid])

    def _released(self, guard: SlotGuard, abandoned: bool) -> None:
        assert isinstance(guard, RemoteGuard)
        self._guards.pop(guard.rid, None)
        self._reported.pop(guard.rid, None)
        guard.agent.guards.discard(guard)
        self.send(["release", guard.rid, abandoned])

    async def has_candidates(
        self, exclude: Iterable[str], model: str | None, route: str | None
    ) -> bool:
        answer = await self._ask(["candidates", sorted(exclude), model, route])
        return bool(answer[2])

    def trip(self, agent: AgentController, reason: str) -> None:
        self.send(["trip", agent.url, reason])

    def record_failure(self, agent: AgentController, reason: str) -> None:
        self.send(["failure", agent.url, reason])

    def record_success(self, agent: AgentController) -> None:
        self.send(["success", agent.url])

    def lacks_route(self, agent: AgentController, route: str) -> None:
        self.send(["lacks_route", agent.url, route])

    def offers_route(self, agent: AgentController, route: str) -> None:
        self.send(["offers_route", agent.url, route])

    def learn(self, guard: SlotGuard, demand: Demand, report: CacheReport) -> None:
        if isinstance(guard, RemoteGuard):
            self.send(
                [
                    "learn",
                    guard.rid,
                    report.cached_tokens,
                    report.computed_tokens,
                    report.prompt_seconds,
                ]
            )

    async def health(self) -> FleetHealth:
        answer = await self._ask(["health"])
        return FleetHealth(*(int(value) for value in answer[2]))

    async def model_listing(self) -> list[dict[str, Any]]:
        answer = await self._ask(["listing"])
        return list(answer[2])

    def close(self) -> None:
        """Nothing to do: the host answers the waiters when it shuts down."""

    def disconnect(self) -> None:
        self._leaving = True
        super().close()

    # -- progress ---------------------------------------------------------------------------

    def _send_progress(self) -> None:
        changed = []
        for rid, guard in self._guards.items():
            received = guard.received
            if received is None:
                continue
            total = received.total_bytes
            if self._reported.get(rid) != total:
                self._reported[rid] = total
                changed.append([rid, total])
        if changed:
            self.send(["progress", changed])
