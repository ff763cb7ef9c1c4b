"""A fleet shared by several balancers through Redis: ``fleet.Fleet`` for ``--state redis://``.

Not wired into the balancer yet (issue 11; docs/ha.md says what is built). The proxy of each
replica talks to this as it talks to ``LocalFleet``: the membership comes from
``redis_registry`` (written by each agent's owner, followed here), the reservations and the
buffer from ``redis_leases``, so that every replica's reservations on a server are counted
together and a waiting request is served in its fleet-wide turn.

- **A reservation** is one script: the candidates are the usable servers of the request's model
  (all of them, up to ``MAX_CANDIDATES``), and the script takes the one with the most free
  slots fleet-wide, or queues the request behind the others of its model. So routing here is by
  slots (``--routing slots``); the prefix index is not shared yet.
- **A waiting request** is woken by the message its hand-off publishes on this replica's
  channel; its deadline, or its client leaving, takes its ticket out of the queue (and gives
  back the slot it was handed, if the two crossed).
- **Leases and tickets are renewed** every third of the lease timeout while their requests run
  or wait; a replica that dies stops renewing, and the fleet gets their slots back.
- **Circuits** (a server's failures) are this replica's own for now: each replica takes a
  failing server out of its own rotation.

Requests that need no slot (``GET /props``, the model list of a server) go to the first usable
server of their model, with no lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import Naming, accepts
from paddler.balancer.fleet.agent_mirror import AgentMirrors
from paddler.balancer.fleet.model_names import model_id, names_of
from paddler.balancer.fleet.redis_leases import RedisLeases
from paddler.balancer.fleet.redis_registry import (
    LISTEN_TIMEOUT,
    AgentRecord,
    Change,
    RedisRegistry,
)
from paddler.balancer.fleet.request_buffer import (
    BufferRejection,
    BufferTimeout,
    NoCandidates,
    ShuttingDown,
)
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.fleet.state import FleetHealth
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand
from paddler.lifecycle import wait_or_shutdown

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64
"""The most servers one reservation compares (each costs the script a few commands)."""

_CROSSED_WAIT = 5.0
"""How long a request whose deadline crossed its hand-off waits for the message that names its
server (it was published before the ticket's removal failed)."""

_RETRY_DELAY = 1.0
"""How long to wait before following Redis again after losing it."""


class StateUnreachable(BufferRejection):
    """Redis did not answer a reservation: the request gets a 503 (with Retry-After), as when
    the buffer is full, rather than a slot nobody counted."""


class RedisGuard(SlotGuard):
    __slots__ = ("lease",)

    lease: str


class RedisFleet:
    """One replica's view of the shared fleet. ``replica``: its name among the balancers (its
    tickets' owner); ``failure_threshold`` failures in a row take a server out of this replica's
    rotation for ``circuit_cooldown`` seconds."""

    def __init__(
        self,
        client: Redis,
        *,
        fleet: str,
        replica: str,
        buffer_timeout: float,
        stale_after: float,
        lease_timeout: float = 10.0,
        allow_unknown_models: bool = False,
        failure_threshold: int = 3,
        circuit_cooldown: float = 10.0,
        subscriber: Redis | None = None,
    ) -> None:
        """``subscriber``: the client to subscribe with (by default ``client``): one without a
        read timeout (see ``shared_state``)."""
        self._client = client
        self._subscriber = subscriber or client
        self._replica = replica
        self._buffer_timeout = buffer_timeout
        self._lease_timeout = lease_timeout
        self._leases = RedisLeases(client, fleet, replica=replica, lease_timeout=lease_timeout)
        self._registry = RedisRegistry(
            client, fleet, replica=replica, stale_after=stale_after, subscriber=self._subscriber
        )
        self._loop = asyncio.get_running_loop()
        self._mirrors = AgentMirrors()
        self._names: dict[str, frozenset[str]] = {}
        """Every name each server's models answer to, by agent id (``model_names``)."""
        self._verified: set[str] = set()
        """The servers whose records say they were verified (their names count)."""
        self._allow_unknown = allow_unknown_models
        self._naming = Naming(frozenset(), frozenset(), allow_unknown_models)
        self._failure_threshold = failure_threshold
        self._circuit_cooldown = circuit_cooldown
        self._failures: dict[str, int] = {}
        self._tripped: dict[str, float] = {}
        """Servers out of this replica's rotation, until when (loop clock)."""
        self._tickets = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[str]] = {}
        """This replica's waiting requests, by ticket: the server a hand-off gave each."""
        self._queue_of: dict[str, str | None] = {}
        """The queue (model) each waiting ticket is in."""
        self._queued: set[str] = set()
        """The tickets Redis said it queued (the others' scripts have not answered yet)."""
        self._recovered: set[str] = set()
        """Tickets whose hand-off was found after a broken channel: their message, if it still
        comes, is not news."""
        self._held: dict[str, dict[str, RedisGuard]] = {}
        """This replica's leases, by server and lease id."""
        self._releases: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        """Set (and cleared) at each membership change: what a request that needs no slot and
        found no server waits for."""
        self._closed = False
        self._stop = asyncio.Event()
        self.followed = asyncio.Event()
        """Set once the membership has been read whole (the replica's fleet is complete)."""

    # -- the service ------------------------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        """Follow the membership, hear the hand-offs and renew the leases until shutdown."""
        tasks = [
            asyncio.create_task(self._follow(), name="fleet membership"),
            asyncio.create_task(self._listen(), name="fleet hand-offs"),
            asyncio.create_task(self._renew(), name="fleet leases"),
        ]
        try:
            await shutdown.wait()
        finally:
            # Cancelled, and told to stop: a cancellation that lands inside redis-py's read can
            # be lost in it, and each loop looks at the flag at least every LISTEN_TIMEOUT.
            self._stop.set()
            for task in tasks:
                task.cancel()
            _, running = await asyncio.wait(tasks, timeout=2 * LISTEN_TIMEOUT)
            for task in running:
                log.warning("%s did not stop", task.get_name())
            await asyncio.gather(*(task for task in tasks if task.done()), return_exceptions=True)
            if self._releases:
                await asyncio.gather(*self._releases, return_exceptions=True)

    async def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                await self._registry.follow(self._membership_changed, self.followed, self._stop)
            except (RedisError, OSError) as error:
                log.warning("lost the fleet's membership on Redis (%s); following again", error)
                await wait_or_shutdown(self._stop, _RETRY_DELAY)

    def _membership_changed(self, change: Change) -> None:
        if isinstance(change, AgentRecord):
            names_here = frozenset().union(*map(names_of, change.models))
            if (
                self._names.get(change.id) == names_here
                and (change.id in self._verified) == change.verified
            ):
                self._changed.set()
                self._changed.clear()
                return  # a report: the fleet's names are as they were
            self._names[change.id] = names_here
            if change.verified:
                self._verified.add(change.id)
            else:
                self._verified.discard(change.id)
        else:
            self._names.pop(change[0], None)
            self._verified.discard(change[0])
        verified = [self._names[agent_id] for agent_id in self._verified if agent_id in self._names]
        names = frozenset().union(*verified) if verified else frozenset()
        ids = frozenset(model_id(name) for record in self._records() for name in record.models)
        self._naming = Naming(names, ids, self._allow_unknown)
        self._changed.set()
        self._changed.clear()

    async def _listen(self) -> None:
        first = True
        while not self._stop.is_set():
            channels = self._subscriber.pubsub()
            try:
                await channels.subscribe(self._leases.wake_channel)
                if not first:
                    await self._recover_waiters()
                first = False
                while not self._stop.is_set():
                    message = await channels.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT
                    )
                    if message is not None and message.get("type") == "message":
                        self._woken(message["data"])
            except (RedisError, OSError) as error:
                log.warning("lost the hand-offs' channel on Redis (%s); listening again", error)
                await wait_or_shutdown(self._stop, _RETRY_DELAY)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await channels.aclose()  # type: ignore[no-untyped-call]

    async def _recover_waiters(self) -> None:
        """After the channel broke: a waiter handed a slot meanwhile hears it now, and one that
        Redis forgot (a restart) waits again, behind those already waiting."""
        servers = list(self._registry.agents)
        self._recovered.clear()  # the messages of an earlier break have come, or never will
        for ticket, future in list(self._waiting.items()):
            if future.done() or ticket not in self._queued:
                continue  # answered, or its own script is still to answer
            where = await self._leases.locate(ticket, servers)
            if where is True:
                continue
            server = where or None
            if server is None:
                model = self._queue_of.get(ticket)
                server = await self._leases.reserve_or_wait(
                    self._candidates(model, ()), ticket, model=model, most_free=True
                )
            if server is not None and not future.done():
                if where:
                    self._recovered.add(ticket)
                future.set_result(server)

    def _woken(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        ticket, _, agent_id = text.partition(" ")
        if ticket in self._recovered:
            self._recovered.discard(ticket)
            return  # found already, after a broken channel
        future = self._waiting.get(ticket)
        if future is not None and not future.done():
            future.set_result(agent_id)
        elif agent_id and ticket not in self._held.get(agent_id, {}):
            # Its request went away as the slot was handed to it: the slot goes back.
            self._release_later(agent_id, ticket, abandoned=False)

    async def _renew(self) -> None:
        interval = self._lease_timeout / 3
        while not await wait_or_shutdown(self._stop, interval):
            try:
                for agent_id, leases in list(self._held.items()):
                    if leases:
                        await self._leases.renew(agent_id, list(leases))
                if self._waiting:
                    await self._leases.renew_tickets(list(self._waiting))
            except (RedisError, OSError) as error:
                log.warning("could not renew this replica's leases on Redis: %s", error)

    # -- fleet.Fleet ------------------------------------------------------------------------

    @property
    def buffer_timeout(self) -> float:
        return self._buffer_timeout

    def accepts(self, model: str) -> bool:
        return accepts(model, self._naming)

    def model_ids(self) -> list[str]:
        return sorted(self._naming.ids)

    def acquire_now(self, demand: Demand) -> SlotGuard | None:
        """Never at once: every reservation is a script on Redis."""
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        return None

    def wait(self, demand: Demand, deadline: float) -> Coroutine[Any, Any, SlotGuard]:
        return self.acquire(demand, deadline)

    async def acquire(self, demand: Demand, deadline: float) -> SlotGuard:
        if self._closed:
            raise ShuttingDown("the balancer is shutting down")
        if not demand.needs_slot:
            return await self._any_server(demand, deadline)
        candidates = self._candidates(demand.model, demand.exclude)
        if demand.exclude and not candidates:
            raise NoCandidates("every server was tried")
        queue = demand.model if demand.model is not None and self._served(demand.model) else None
        ticket = f"{self._replica}:{next(self._tickets)}"
        future: asyncio.Future[str] = self._loop.create_future()
        self._waiting[ticket] = future
        self._queue_of[ticket] = queue
        try:
            agent_id = await self._leases.reserve_or_wait(
                candidates, ticket, model=queue, most_free=True
            )
            if agent_id is None:
                self._queued.add(ticket)
                agent_id = await self._await_hand_off(ticket, future, queue, deadline)
        except (asyncio.CancelledError, ShuttingDown):
            # The client went away while it waited (or the balancer is stopping): out of the
            # queue, and a slot it was handed meanwhile goes back (done off this task, which
            # may be being cancelled).
            self._abandon_later(ticket, future, queue)
            raise
        except (RedisError, OSError) as error:
            self._abandon_later(ticket, future, queue)
            log.warning("no reservation: Redis did not answer (%s)", error)
            raise StateUnreachable(
                "the balancer cannot reach the fleet's shared state; retry shortly"
            ) from None
        finally:
            self._waiting.pop(ticket, None)
            self._queue_of.pop(ticket, None)
            self._queued.discard(ticket)
        return self._guard(agent_id, ticket)

    async def _await_hand_off(
        self, ticket: str, future: asyncio.Future[str], queue: str | None, deadline: float
    ) -> str:
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            if await self._leases.leave(ticket, model=queue):
                raise BufferTimeout(f"no slot freed up within {self._buffer_timeout:g}s") from None
        # The deadline crossed the hand-off: the slot is this request's.
        async with asyncio.timeout(_CROSSED_WAIT):
            return await future

    def _abandon_later(self, ticket: str, future: asyncio.Future[str], queue: str | None) -> None:
        async def abandon() -> None:
            if await self._leases.leave(ticket, model=queue):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CROSSED_WAIT):
                    agent_id = await future
                    await self._leases.release(
                        agent_id, ticket, models=sorted(self._names.get(agent_id, ()))
                    )

        self._track(abandon())

    async def _any_server(self, demand: Demand, deadline: float) -> SlotGuard:
        """A server of the demand's model for a request that holds no slot."""
        try:
            async with asyncio.timeout_at(deadline):
                while not (candidates := self._candidates(demand.model, demand.exclude)):
                    if demand.exclude:
                        raise NoCandidates("every server was tried")
                    await self._changed.wait()
        except TimeoutError:
            raise BufferTimeout(f"no server within {self._buffer_timeout:g}s") from None
        record = self._registry.agents[candidates[0]]
        return SlotGuard(self._mirror(record), False, self._loop.time(), self._forget)

    def _candidates(self, model: str | None, exclude: Iterable[str]) -> list[str]:
        now = self._loop.time()
        excluded = frozenset(exclude)
        usable = [
            record
            for record in self._records()
            if record.state == "ok"
            and record.slots_total > 0
            and record.id not in excluded
            and self._tripped.get(record.id, 0.0) <= now
        ]
        if model is not None:
            serving = [record for record in usable if model in self._names.get(record.id, ())]
            if serving or self._served(model):
                usable = serving
        return [record.id for record in usable[:MAX_CANDIDATES]]

    def _served(self, model: str) -> bool:
        """Whether a verified server answers to the name (otherwise any server may be asked, in
        a fleet that accepts the name at all)."""
        return model in self._naming.names

    def _records(self) -> Iterable[AgentRecord]:
        return (record for record in self._registry.agents.values() if record.verified)

    def _mirror(self, record: AgentRecord) -> AgentController:
        return self._mirrors.get([record.id, record.name, record.scheme, record.host, record.port])

    def _guard(self, agent_id: str, lease: str) -> SlotGuard:
        record = self._registry.agents.get(agent_id)
        if record is None:  # gone from the fleet this very moment: its lease goes back
            self._release_later(agent_id, lease, abandoned=False)
            raise NoCandidates(f"{agent_id} left the fleet")
        agent = self._mirror(record)
        guard = RedisGuard(agent, True, self._loop.time(), self._released)
        guard.lease = lease
        self._held.setdefault(agent_id, {})[lease] = guard
        agent.guards.add(guard)
        return guard

    def _released(self, guard: SlotGuard, abandoned: bool) -> None:
        assert isinstance(guard, RedisGuard)
        agent_id = guard.agent.id
        leases = self._held.get(agent_id)
        if leases is not None:
            leases.pop(guard.lease, None)
            if not leases:
                del self._held[agent_id]
        guard.agent.guards.discard(guard)
        self._release_later(agent_id, guard.lease, abandoned)

    def _forget(self, guard: SlotGuard, abandoned: bool) -> None:
        """A guard that held no slot: nothing to give back."""

    def _release_later(self, agent_id: str, lease: str, abandoned: bool) -> None:
        models = sorted(self._names.get(agent_id, ()))
        settle = self._lease_timeout if abandoned else 0.0
        self._track(self._leases.release(agent_id, lease, models=models, settle_for=settle))

    def _track(self, work: Coroutine[Any, Any, object]) -> None:
        async def tracked() -> None:
            try:
                await work
            except (RedisError, OSError) as error:
                # The lease expires by itself within the lease timeout.
                log.warning("could not give a lease back on Redis: %s", error)

        task = self._loop.create_task(tracked())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def has_candidates(
        self, exclude: Iterable[str], model: str | None, route: str | None
    ) -> bool:
        return bool(self._candidates(model, exclude))

    def trip(self, agent: AgentController, reason: str) -> None:
        self._tripped[agent.id] = self._loop.time() + self._circuit_cooldown
        self._failures.pop(agent.id, None)
        log.warning("%s out of this balancer's rotation: %s", agent.name, reason[:300])

    def record_failure(self, agent: AgentController, reason: str) -> None:
        failures = self._failures[agent.id] = self._failures.get(agent.id, 0) + 1
        if failures >= self._failure_threshold:
            self.trip(agent, f"{failures} failures in a row, the last: {reason}")

    def record_success(self, agent: AgentController) -> None:
        self._failures.pop(agent.id, None)

    def lacks_route(self, agent: AgentController, route: str) -> None:
        """Not kept fleet-wide yet: the server answers 501 again, and the request moves on."""

    def offers_route(self, agent: AgentController, route: str) -> None:
        """See ``lacks_route``."""

    def learn(self, guard: SlotGuard, demand: Demand, report: CacheReport) -> None:
        """The prefix index is not shared yet (routing by slots alone)."""

    async def health(self) -> FleetHealth:
        """The fleet's figures from Redis: the same from every replica. A replica that cannot
        reach Redis counts nothing usable (``/health`` answers 503: out of its load balancer's
        rotation until Redis is back)."""
        try:
            return await self._health()
        except (RedisError, OSError) as error:
            log.warning("/health: Redis did not answer (%s)", error)
            return FleetHealth(0, 0, 0, 0)

    async def _health(self) -> FleetHealth:
        records = [record for record in self._records() if record.state == "ok"]
        idle = processing = 0
        slots = await self._leases.slots_of([record.id for record in records])
        for record, (free, _) in zip(records, slots, strict=True):
            idle += free
            processing += record.slots_total - free
        usable = sum(1 for record in records if record.slots_total > 0)
        return FleetHealth(usable, idle, processing, await self._leases.waiting())

    async def model_listing(self) -> list[dict[str, Any]]:
        try:
            return await self._model_listing()
        except (RedisError, OSError) as error:
            log.warning("the model list: Redis did not answer (%s)", error)
            return []

    async def _model_listing(self) -> list[dict[str, Any]]:
        served: dict[str, list[AgentRecord]] = {}
        for record in self._records():
            for model in dict.fromkeys(model_id(name) for name in record.models):
                served.setdefault(model, []).append(record)
        ok = [record.id for record in self._records() if record.state == "ok"]
        free = {
            agent_id: slots[0]
            for agent_id, slots in zip(ok, await self._leases.slots_of(ok), strict=True)
        }
        data = []
        for model, records in sorted(served.items()):
            usable = [record for record in records if record.state == "ok"]
            names = sorted(
                frozenset().union(
                    *(
                        names_of(name)
                        for record in records
                        for name in record.models
                        if model_id(name) == model
                    )
                )
            )
            idle = sum(free[record.id] for record in usable)
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llamacpp",
                    "paddler": {
                        "names": names,
                        "agents": len(records),
                        "agents_usable": len(usable),
                        "slots_total": sum(record.slots_total for record in usable),
                        "slots_idle": idle,
                    },
                }
            )
        return data

    def close(self) -> None:
        self._closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ShuttingDown("the balancer is shutting down"))
