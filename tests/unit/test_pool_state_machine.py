"""The pool and the buffer under random sequences of operations, checked after every step.

A Hypothesis state machine drives the real ``AgentControllerPool`` and ``RequestBuffer``:
agents register (new or taking over an address), report, are removed or go stale; requests
reserve directly (``pick`` + ``reserve``) or through the buffer, and are released normally,
abandoned, released twice, cancelled while waiting, or time out; circuits trip; the pool's clock
advances. Buffered acquires are tasks on a private event loop that a rule steps explicitly, so
that the interleavings the proxy sees (a slot handed to a waiter that is cancelled before it
resumes, say) happen too.

The invariants: every reservation is counted exactly once (an agent's ``reserved`` and
``in_flight`` equal its live guards, never negative, and a second release changes nothing);
the snapshot's idle plus processing slots equal the usable slots; ``waiting`` equals the queued
waiters; no waiter is left queued while the pool would hand it a slot; nothing raises but the
buffer's own refusals. After the last step everything is released and every count is back to 0.

The settings keep the file under 30 s in CI; to hunt longer, raise ``max_examples`` locally (a
run of 3,000 examples found the removal that did not wake the buffer, see test_request_buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool, FleetFull
from paddler.balancer.fleet.request_buffer import BufferRejection, RequestBuffer, _Waiter
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand, PrefixPolicy, SlotsPolicy, least_loaded
from paddler.balancer.routing.prefix_index import PrefixIndex
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import UNBOUNDED

PORTS = (1, 2, 3, 4)
MODELS = ("alpha", "beta")
PROMPTS = ("", "hello", "the same long system prompt " * 8, "another prompt " * 12)
BUFFER_SIZE = 3
STALE_AFTER = 10.0

statuses = st.builds(
    Status,
    state=st.sampled_from(list(LlamaCppState)),
    slots_idle=st.integers(0, 4),
    slots_processing=st.integers(0, 4),
    models=st.sampled_from([(), ("alpha",), ("beta",), ("alpha", "beta"), ("org/alpha.gguf",)]),
)
ok_statuses = st.builds(
    Status,
    state=st.just(LlamaCppState.OK),
    slots_idle=st.integers(0, 4),
    slots_processing=st.integers(0, 2),
    models=st.sampled_from([(), ("alpha",), ("beta",)]),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Acquire:
    """One buffered request: its task, and the guard it got once the task finished."""

    task: asyncio.Task[SlotGuard]
    demand: Demand
    guard: SlotGuard | None = None
    outcome: str = "pending"


@dataclass
class Ledger:
    """What the test itself handed out, to check the pool's counts against."""

    created: list[SlotGuard] = field(default_factory=list)
    """Every guard the pool handed out, to a caller or to a waiter's future."""
    reserved_for: list[tuple[SlotGuard, Demand]] = field(default_factory=list)
    """Each guard with the request it was reserved for."""
    guards: list[SlotGuard] = field(default_factory=list)
    """The guards that reached a caller: direct reservations and served acquires."""
    released: list[SlotGuard] = field(default_factory=list)
    sessions: dict[int, int] = field(default_factory=dict)
    """The latest session of each agent, by ``id(agent)``."""
    agents: list[AgentController] = field(default_factory=list)
    """Every controller ever seen, removed ones included (their guards still count there)."""


class PoolAndBuffer(RuleBasedStateMachine):
    """The slots policy: deterministic and pure, so ``pick`` can also check for stuck waiters."""

    prefix = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        policy = PrefixPolicy(PrefixIndex(1 << 20)) if self.prefix else SlotsPolicy()
        self.pool = AgentControllerPool(
            policy=policy, clock=self.clock, max_agents=3, settle_timeout=2.0
        )
        self.buffer = RequestBuffer(self.pool, size=BUFFER_SIZE, timeout=3600)
        self.ledger = Ledger()
        self.acquires: list[Acquire] = []
        reserve = self.pool.reserve

        def recording_reserve(agent: AgentController, demand: Demand) -> SlotGuard:
            guard = reserve(agent, demand)
            self.ledger.created.append(guard)
            self.ledger.reserved_for.append((guard, demand))
            return guard

        self.pool.reserve = recording_reserve

    # -- running things on the loop ------------------------------------------------------------

    def call(self, function: object, *args: object, **kwargs: object) -> object:
        """Run a synchronous pool operation inside the loop (the buffer may schedule timers)."""

        async def inside() -> object:
            return function(*args, **kwargs)

        try:
            return self.loop.run_until_complete(inside())
        finally:
            self.collect()

    def step_loop(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            self.loop.run_until_complete(asyncio.sleep(0))
        self.collect()

    def collect(self) -> None:
        """Move finished acquires' guards into the ledger; only the buffer's refusals may fail."""
        for acquire in self.acquires:
            if acquire.outcome != "pending" or not acquire.task.done():
                continue
            if acquire.task.cancelled():
                acquire.outcome = "cancelled"
                continue
            error = acquire.task.exception()
            if error is None:
                acquire.guard = acquire.task.result()
                acquire.outcome = "served"
                self.ledger.guards.append(acquire.guard)
            elif isinstance(error, BufferRejection):
                acquire.outcome = type(error).__name__
            else:
                raise error

    def track(self, agent: AgentController) -> None:
        if all(known is not agent for known in self.ledger.agents):
            self.ledger.agents.append(agent)

    def live_agents(self) -> list[AgentController]:
        return self.pool.agents()

    def live_guards(self) -> list[SlotGuard]:
        return [guard for guard in self.ledger.guards if not guard.released]

    def pending(self) -> list[Acquire]:
        return [acquire for acquire in self.acquires if acquire.outcome == "pending"]

    # -- rules: membership ---------------------------------------------------------------------

    @initialize(status=ok_statuses)
    def first_agent(self, status: Status) -> None:
        self.register(port=PORTS[0], name="a", status=status, bound=UNBOUNDED)

    @rule(
        port=st.sampled_from(PORTS),
        name=st.sampled_from("abc"),
        status=statuses,
        bound=st.sampled_from([None, 1, 2, UNBOUNDED]),
    )
    def register(self, port: int, name: str, status: Status, bound: int | None) -> None:
        """``bound``: the balancer reached the address at once and counts at most that many
        slots there (None: not yet, see ``verify``)."""
        try:
            agent, session = self.call(
                self.pool.register, name, Address("http", "127.0.0.1", port), status
            )
        except FleetFull:
            assert len(self.pool) == 3
            return
        self.track(agent)
        self.ledger.sessions[id(agent)] = session
        if bound is not None:
            assert self.call(self.pool.verified, agent, bound, session=session)

    @precondition(lambda self: self.ledger.agents)
    @rule(data=st.data(), bound=st.sampled_from([1, 2, UNBOUNDED]), reached=st.booleans())
    def verify(self, data: st.DataObject, bound: int, reached: bool) -> None:
        """The verifier's verdict on an agent, live or removed (a late answer)."""
        agent = data.draw(st.sampled_from(self.ledger.agents))
        session = self.ledger.sessions[id(agent)]
        if reached:
            done = self.call(self.pool.verified, agent, bound, session=session)
        else:
            done = self.call(self.pool.unverified, agent, "test", session=session)
        assert done == (not agent.removed)

    @precondition(lambda self: self.live_agents())
    @rule(data=st.data(), status=statuses)
    def report(self, data: st.DataObject, status: Status) -> None:
        agent = data.draw(st.sampled_from(self.live_agents()))
        assert self.call(self.pool.report, agent, self.ledger.sessions[id(agent)], status)

    @precondition(lambda self: self.live_agents())
    @rule(data=st.data(), status=statuses)
    def report_from_an_old_session(self, data: st.DataObject, status: Status) -> None:
        agent = data.draw(st.sampled_from(self.live_agents()))

        def report() -> None:
            before = (agent.status, agent.reserved, agent.foreign)
            assert not self.pool.report(agent, self.ledger.sessions[id(agent)] - 1, status)
            assert (agent.status, agent.reserved, agent.foreign) == before

        self.call(report)

    @precondition(lambda self: self.ledger.agents)
    @rule(data=st.data(), by_session=st.booleans())
    def remove(self, data: st.DataObject, by_session: bool) -> None:
        agent = data.draw(st.sampled_from(self.ledger.agents))
        session = self.ledger.sessions[id(agent)] if by_session else None
        was_live = not agent.removed
        removed = self.call(self.pool.remove, agent, session, "test")
        assert removed == was_live
        assert agent.removed

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.5, 11.0, 61.0]))
    def advance_time(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def sweep(self) -> None:
        self.call(self.pool.sweep, STALE_AFTER)

    # -- rules: failures -----------------------------------------------------------------------

    @precondition(lambda self: self.live_agents())
    @rule(data=st.data(), how=st.sampled_from(["trip", "failure", "success", "lacks", "offers"]))
    def failure(self, data: st.DataObject, how: str) -> None:
        agent = data.draw(st.sampled_from(self.live_agents()))
        if how == "trip":
            self.call(self.pool.trip, agent, "test")
        elif how == "failure":
            self.call(self.pool.record_failure, agent, "test")
        elif how == "success":
            self.call(self.pool.record_success, agent)
        elif how == "lacks":
            self.call(self.pool.lacks_route, agent, "/v1/embeddings")
        else:
            self.call(self.pool.offers_route, agent, "/v1/embeddings")

    # -- rules: requests -----------------------------------------------------------------------

    @st.composite
    @staticmethod
    def demands(draw: st.DrawFn) -> tuple[bool, str | None, str, str | None]:
        return (
            draw(st.booleans() | st.just(True)),
            draw(st.sampled_from([None, *MODELS, "org/alpha.gguf", "gamma"])),
            draw(st.sampled_from(PROMPTS)),
            draw(st.sampled_from([None, "/v1/chat/completions", "/v1/embeddings"])),
        )

    def demand(self, data: st.DataObject) -> Demand:
        needs_slot, model, prompt, route = data.draw(self.demands())
        demand = Demand.of(needs_slot, model, prompt, route)
        ids = sorted({agent.id for agent in self.ledger.agents})
        if ids and data.draw(st.integers(0, 3)) == 0:
            demand.exclude = frozenset(data.draw(st.lists(st.sampled_from(ids), max_size=2)))
        return demand

    @rule(data=st.data())
    def reserve_directly(self, data: st.DataObject) -> None:
        """As the proxy does without a buffer: pick, and reserve what was picked."""
        demand = self.demand(data)
        agent = self.call(self.pool.pick, demand)
        if agent is None:
            self.call(self.pool.policy.abandoned, demand)
            return
        assert isinstance(agent, AgentController)
        assert not demand.needs_slot or agent.free_slots() >= 1
        assert agent.verified, "an agent the balancer never reached was picked"
        guard = self.call(self.pool.reserve, agent, demand)
        assert isinstance(guard, SlotGuard)
        self.ledger.guards.append(guard)

    @rule(data=st.data(), expired=st.booleans(), steps=st.integers(0, 2))
    def acquire(self, data: st.DataObject, expired: bool, steps: int) -> None:
        """A buffered request; with ``expired`` its deadline is already past (a timeout)."""
        demand = self.demand(data)
        deadline = self.loop.time() - 1 if expired else None
        task = self.loop.create_task(self.buffer.acquire(demand, deadline=deadline))
        self.acquires.append(Acquire(task, demand))
        self.step_loop(steps)

    @rule(rounds=st.integers(1, 4))
    def let_the_loop_run(self, rounds: int) -> None:
        self.step_loop(rounds)

    @precondition(lambda self: self.live_guards())
    @rule(data=st.data(), abandoned=st.booleans(), twice=st.booleans())
    def release(self, data: st.DataObject, abandoned: bool, twice: bool) -> None:
        guard = data.draw(st.sampled_from(self.live_guards()))
        self.call(guard.release, abandoned=abandoned)
        if twice:
            before = (guard.agent.reserved, guard.agent.in_flight, len(guard.agent.settling))
            self.call(guard.release, abandoned=not abandoned)
            after = (guard.agent.reserved, guard.agent.in_flight, len(guard.agent.settling))
            assert after == before, "a second release changed the counts"
        self.ledger.released.append(guard)

    @precondition(lambda self: self.live_guards())
    @rule(data=st.data())
    def release_as_a_context_manager_on_cancellation(self, data: st.DataObject) -> None:
        guard = data.draw(st.sampled_from(self.live_guards()))

        def leave() -> None:
            with contextlib.suppress(asyncio.CancelledError), guard:
                raise asyncio.CancelledError

        self.call(leave)
        self.ledger.released.append(guard)

    @precondition(lambda self: self.pending())
    @rule(data=st.data(), steps=st.integers(0, 2))
    def cancel_a_waiter(self, data: st.DataObject, steps: int) -> None:
        """A client that goes away while its request waits (maybe just as a slot was handed)."""
        acquire = data.draw(st.sampled_from(self.pending()))
        acquire.task.cancel()
        self.step_loop(steps)

    @precondition(lambda self: self.live_guards() and self.pending())
    @rule(data=st.data())
    def release_then_cancel_the_next_waiter(self, data: st.DataObject) -> None:
        """The slot goes to a waiter whose client leaves before its task resumes."""
        guard = data.draw(st.sampled_from(self.live_guards()))
        # The oldest waiter is the one a freed slot goes to (FIFO): cancel it, or another.
        acquire = data.draw(st.sampled_from(self.pending()[:1]) | st.sampled_from(self.pending()))

        def both() -> None:
            guard.release()
            acquire.task.cancel()

        self.call(both)
        self.ledger.released.append(guard)

    @precondition(lambda self: self.prefix and self.live_guards())
    @rule(data=st.data(), tokens=st.integers(0, 400), seconds=st.sampled_from([0.0, 0.01, 1.0]))
    def learn(self, data: st.DataObject, tokens: int, seconds: float) -> None:
        """What llama.cpp reported about a finished request (prefix routing measures on it)."""
        guard = data.draw(st.sampled_from(self.live_guards()))
        demand = Demand.of(True, None, data.draw(st.sampled_from(PROMPTS)))
        report = CacheReport(
            cached_tokens=tokens // 2, computed_tokens=tokens - tokens // 2, prompt_seconds=seconds
        )
        self.call(self.pool.policy.learn, guard.agent, demand, report)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_reservation_counts_exactly_once(self) -> None:
        unreleased = [guard for guard in self.ledger.created if not guard.released]
        for agent in self.ledger.agents:
            live = [guard for guard in unreleased if guard.agent is agent]
            assert agent.in_flight == len(live), (agent.id, agent.in_flight, len(live))
            assert agent.reserved == sum(guard.holds_slot for guard in live), agent.id
            assert agent.reserved >= 0
            assert agent.in_flight >= 0
        assert all(guard.released for guard in self.ledger.released)
        held = {id(guard) for guard in self.ledger.guards}
        waiting = {id(acquire.demand) for acquire in self.acquires if not acquire.task.done()}
        for guard, demand in self.ledger.reserved_for:
            if not guard.released and id(guard) not in held:
                assert id(demand) in waiting, "a reservation reached nobody and is never released"

    @invariant()
    def the_snapshot_adds_up(self) -> None:
        snapshot = self.pool.snapshot()
        usable = [agent for agent in self.pool.agents() if agent.usable()]
        assert snapshot.usable_agents == len(usable)
        assert snapshot.slots_total == sum(agent.slots_total for agent in usable)
        # The totals are kept by the capacity index as agents change: they must be what a walk
        # of the fleet finds.
        assert snapshot.slots_idle == sum(agent.free_slots() for agent in usable)
        assert snapshot.slots_processing == sum(
            min(agent.busy_slots(), agent.slots_total) for agent in usable
        )
        assert self.pool.totals().slots_idle == snapshot.slots_idle
        assert snapshot.slots_idle >= 0
        assert snapshot.slots_processing >= 0
        for agent in self.pool.agents():
            if not agent.verified:
                assert not agent.usable() and agent.slots_total == 0, "unverified slots counted"
            else:
                assert agent.slots_total <= agent.slot_bound
        for agent in snapshot.agents:
            assert agent.slots_idle + agent.slots_processing == agent.slots_total
            assert agent.slots_idle >= 0
            assert agent.slots_processing >= 0

    @invariant()
    def the_index_picks_what_a_walk_of_the_fleet_would(self) -> None:
        if self.prefix:
            return
        usable = [agent for agent in self.pool.agents() if agent.usable()]
        for needs_slot in (True, False):
            assert self.pool.pick(Demand(needs_slot)) is least_loaded(usable, needs_slot)
            assert self.pool.has_free(None, needs_slot) == (
                least_loaded(usable, needs_slot) is not None
            )

    def _queued(self) -> list[_Waiter]:
        return [waiter for queue in self.buffer._queues.values() for waiter in queue.values()]

    @invariant()
    def waiting_counts_the_queued_waiters(self) -> None:
        queued = [waiter for queue in self.buffer._queues.values() for waiter in queue.values()]
        assert self.buffer.waiting == len(queued)
        assert all(queue for queue in self.buffer._queues.values())
        preferring = [w for queue in self.buffer._prefers.values() for w in queue.values()]
        assert all(queue for queue in self.buffer._prefers.values())
        assert {id(waiter) for waiter in preferring} <= {id(waiter) for waiter in queued}
        # A waiter whose task was just cancelled (or timed out) has a cancelled future until
        # the task resumes and takes it out of the queue; dispatch skips it meanwhile.
        assert all(not waiter.future.done() or waiter.future.cancelled() for waiter in queued)
        assert self.buffer.waiting <= len(self.pending())

    @invariant()
    def no_waiter_is_left_queued_while_a_slot_would_be_handed_to_it(self) -> None:
        if self.prefix:
            # The prefix policy may choose to wait, and its choice mutates the request's record.
            awaited: dict[int, int] = {}
            for waiter in self._queued():
                if waiter.demand.waiting_for is not None:
                    key = id(waiter.demand.waiting_for)
                    awaited[key] = awaited.get(key, 0) + 1
            for agent in self.ledger.agents:
                assert agent.awaited == awaited.get(id(agent), 0), (agent.id, agent.awaited)
            return
        for waiter in self._queued():
            if waiter.future.done():
                continue
            assert self.pool.pick(waiter.demand) is None, (
                f"a waiter for {waiter.demand.model!r} is queued while "
                f"{self.pool.pick(waiter.demand).id!r} has room for it"
            )

    def teardown(self) -> None:
        try:
            for acquire in self.pending():
                acquire.task.cancel()
            self.step_loop(3)
            assert not self.pending(), "a cancelled acquire never finished"
            for guard in self.live_guards():
                self.call(guard.release)
            leaked = [guard for guard in self.ledger.created if not guard.released]
            assert not leaked, (
                f"{len(leaked)} reservation(s) reached nobody and were never released"
            )
            for agent in self.ledger.agents:
                assert (agent.reserved, agent.in_flight) == (0, 0), agent.id
            assert self.buffer.waiting == 0
            if self.prefix:
                assert all(agent.awaited == 0 for agent in self.ledger.agents)
        finally:
            self.buffer.close()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


class PoolAndBufferWithPrefixRouting(PoolAndBuffer):
    """The prefix policy, which may keep a request waiting for the server that holds its prefix."""

    prefix = True


RUNS = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestPoolAndBufferKeepTheirCountsUnderRandomOperations = PoolAndBuffer.TestCase
TestPoolAndBufferKeepTheirCountsUnderRandomOperations.settings = RUNS
TestPoolAndBufferKeepTheirCountsUnderRandomOperations.__doc__ = (
    "Random register, report, remove, reserve, release, cancel and timeouts keep every count."
)
TestPrefixRoutingKeepsItsCountsUnderRandomOperations = PoolAndBufferWithPrefixRouting.TestCase
TestPrefixRoutingKeepsItsCountsUnderRandomOperations.settings = RUNS
TestPrefixRoutingKeepsItsCountsUnderRandomOperations.__doc__ = (
    "The same, with prefix routing: requests it keeps waiting are counted once and let go."
)
