"""The fleet's bookkeeping: the pick, reservations, reconciliation with reports, membership."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool, FleetFull
from paddler.balancer.routing.policies import Demand
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(idle: int, processing: int = 0, state: LlamaCppState = LlamaCppState.OK) -> Status:
    return Status(state=state, slots_idle=idle, slots_processing=processing)


def address(port: int) -> Address:
    return Address("http", "127.0.0.1", port)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> AgentControllerPool:
    return AgentControllerPool(
        settle_timeout=2.0, circuit_cooldown=5.0, failure_threshold=3, clock=clock
    )


def test_pick_prefers_the_agent_with_most_free_slots(pool: AgentControllerPool) -> None:
    """The free agent with the most idle slots wins."""
    join(pool, "a", address(1), status(idle=1, processing=3))
    join(pool, "b", address(2), status(idle=3, processing=1))
    join(pool, "c", address(3), status(idle=2, processing=2))
    picked = pool.pick(Demand(True))
    assert picked is not None
    assert picked.name == "b"


def test_pick_breaks_ties_by_fewest_busy_then_name(pool: AgentControllerPool) -> None:
    """Equal free slots go to the least busy agent, then to the first name, deterministically."""
    join(pool, "zeta", address(1), status(idle=2, processing=0))
    join(pool, "alpha", address(2), status(idle=2, processing=2))
    join(pool, "beta", address(3), status(idle=2, processing=0))
    picked = pool.pick(Demand(True))
    assert picked is not None
    assert picked.name == "beta"


def test_pick_skips_agents_without_a_free_slot_or_not_ok(pool: AgentControllerPool) -> None:
    """Only usable agents with a free slot qualify for generating requests."""
    join(pool, "full", address(1), status(idle=0, processing=2))
    join(pool, "loading", address(2), status(idle=4, state=LlamaCppState.LOADING))
    assert pool.pick(Demand(True)) is None
    full = pool.pick(Demand(False))
    assert full is not None
    assert full.name == "full"


def test_reservations_count_against_free_slots(pool: AgentControllerPool) -> None:
    """Dispatching reserves a slot at once, before any report shows it busy."""
    agent, _ = join(pool, "a", address(1), status(idle=2))
    first = pool.reserve(agent, Demand(True))
    pool.reserve(agent, Demand(True))
    assert pool.pick(Demand(True)) is None
    first.release()
    assert pool.pick(Demand(True)) is agent


def test_a_report_never_frees_or_double_counts_a_reserved_slot(pool: AgentControllerPool) -> None:
    """A slot both reserved and reported counts once; only traffic beyond ours adds to it."""
    agent, session = join(pool, "a", address(1), status(idle=4))
    guards = [pool.reserve(agent, Demand(True)) for _ in range(2)]
    pool.report(agent, session, status(idle=4, processing=0))  # stale sample: shows nothing busy
    assert agent.free_slots() == 2
    pool.report(agent, session, status(idle=2, processing=2))  # the same two requests, seen
    assert agent.free_slots() == 2
    pool.report(agent, session, status(idle=1, processing=3))  # one more from outside Paddler
    assert agent.free_slots() == 1
    for guard in guards:
        guard.release()
    assert agent.free_slots() == 3  # our two ended; the outsider's slot stays busy


def test_a_finished_request_frees_its_slot_before_the_next_report(
    pool: AgentControllerPool,
) -> None:
    """A stale report that still shows our finished request busy does not hold its slot."""
    agent, session = join(pool, "a", address(1), status(idle=1))
    guard = pool.reserve(agent, Demand(True))
    pool.report(agent, session, status(idle=0, processing=1))  # sees our request running
    guard.release()
    assert pool.pick(Demand(True)) is agent


def test_release_is_exactly_once(pool: AgentControllerPool) -> None:
    """Releasing a guard twice gives the slot back once."""
    agent, _ = join(pool, "a", address(1), status(idle=2))
    guard = pool.reserve(agent, Demand(True))
    guard.release()
    guard.release()
    assert agent.reserved == 0
    assert agent.in_flight == 0


def test_guard_releases_on_exception(pool: AgentControllerPool) -> None:
    """Leaving the guard's block by an error releases the slot."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    with pytest.raises(RuntimeError), pool.reserve(agent, Demand(True)):
        raise RuntimeError("upstream exploded")
    assert agent.free_slots() == 1


async def test_guard_released_by_cancellation_settles_until_next_report(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """A cancelled request's slot stays counted until a report shows llama.cpp let it go."""
    agent, session = join(pool, "a", address(1), status(idle=1))

    async def request() -> None:
        with pool.reserve(agent, Demand(True)):
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert agent.reserved == 0
    assert agent.free_slots() == 0
    pool.report(agent, session, status(idle=1))
    assert agent.free_slots() == 1


def test_settling_slots_expire_without_a_report(pool: AgentControllerPool, clock: Clock) -> None:
    """A settling slot is freed by the sweep once the settle timeout passes."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    pool.reserve(agent, Demand(True)).release(abandoned=True)
    assert agent.free_slots() == 0
    clock.now += 2.5
    pool.sweep(stale_after=10)
    assert agent.free_slots() == 1


def test_stale_agents_are_removed_by_the_sweep(pool: AgentControllerPool, clock: Clock) -> None:
    """An agent that misses reports for the staleness window is removed."""
    quiet, _ = join(pool, "quiet", address(1), status(idle=1))
    chatty, session = join(pool, "chatty", address(2), status(idle=1))
    clock.now += 4
    pool.report(chatty, session, status(idle=1))
    clock.now += 2
    pool.sweep(stale_after=5)
    assert [agent.name for agent in pool.agents()] == ["chatty"]
    assert quiet.removed


def test_removing_an_agent_keeps_its_running_requests_valid(pool: AgentControllerPool) -> None:
    """Requests running on a removed agent finish and release without error."""
    agent, session = join(pool, "a", address(1), status(idle=2))
    guard = pool.reserve(agent, Demand(True))
    assert pool.remove(agent, session, "test")
    assert pool.pick(Demand(False)) is None
    guard.release()
    assert agent.in_flight == 0


def test_reregistration_takes_over_and_old_session_cannot_remove(pool: AgentControllerPool) -> None:
    """A reconnecting agent keeps its reservations; its old socket's close removes nothing."""
    agent, old_session = join(pool, "a", address(1), status(idle=2))
    pool.reserve(agent, Demand(True))
    again, new_session = join(pool, "a", address(1), status(idle=2))
    assert again is agent
    assert agent.reserved == 1
    assert not pool.remove(agent, old_session, "old socket closed")
    assert not pool.report(agent, old_session, status(idle=2))
    assert pool.remove(agent, new_session, "new socket closed")


def test_fleet_size_is_bounded(clock: Clock) -> None:
    """Registrations beyond max_agents are refused."""
    pool = AgentControllerPool(max_agents=2, clock=clock)
    join(pool, "a", address(1), status(idle=1))
    join(pool, "b", address(2), status(idle=1))
    with pytest.raises(FleetFull):
        join(pool, "c", address(3), status(idle=1))


def test_tripped_agent_returns_after_cooldown_and_a_healthy_report(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """An open circuit closes with the first healthy report after the cooldown."""
    agent, session = join(pool, "a", address(1), status(idle=1))
    pool.trip(agent, "connection refused")
    assert pool.pick(Demand(True)) is None
    clock.now += 1
    pool.report(agent, session, status(idle=1))
    assert pool.pick(Demand(True)) is None
    clock.now += 5
    pool.report(agent, session, status(idle=1))
    assert pool.pick(Demand(True)) is agent


def test_repeated_request_failures_open_the_circuit(pool: AgentControllerPool) -> None:
    """Failures that may be the request's fault trip only after the threshold, and reset."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    pool.record_failure(agent, "500")
    pool.record_failure(agent, "500")
    pool.record_success(agent)
    pool.record_failure(agent, "500")
    pool.record_failure(agent, "500")
    assert not agent.circuit_open
    pool.record_failure(agent, "500")
    assert agent.circuit_open


def test_snapshot_aggregates_usable_agents(pool: AgentControllerPool) -> None:
    """The fleet snapshot sums slots of usable agents only."""
    agent, _ = join(pool, "a", address(1), status(idle=3, processing=1))
    join(pool, "b", address(2), status(idle=2, state=LlamaCppState.UNREACHABLE))
    pool.reserve(agent, Demand(True))
    fleet = pool.snapshot()
    # one slot busy before we dispatched (foreign), plus ours
    assert (fleet.slots_idle, fleet.slots_processing, fleet.usable_agents) == (2, 2, 1)
    assert len(fleet.agents) == 2


def test_a_route_a_server_lacks_goes_to_servers_that_may_have_it(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """After a 501 for /v1/embeddings, embeddings avoid that server while others exist, for a
    while only; chat requests are not affected."""
    lacking, _ = join(pool, "lacking", address(1), status(idle=4))
    other, _ = join(pool, "other", address(2), status(idle=1))
    pool.lacks_route(lacking, "/v1/embeddings")
    assert pool.pick(Demand(True, route="/v1/embeddings")) is other
    assert pool.pick(Demand(True, route="/v1/chat/completions")) is lacking
    assert not pool.has_candidates({other.id}, route="/v1/embeddings")
    assert pool.has_candidates({other.id})
    clock.now += 61
    assert pool.pick(Demand(True, route="/v1/embeddings")) is lacking


def test_when_every_server_lacks_a_route_the_request_still_reaches_one(
    pool: AgentControllerPool,
) -> None:
    """The client then gets llama.cpp's own 501 and its reason, not a wait or a 502."""
    agent, _ = join(pool, "only", address(1), status(idle=1))
    pool.lacks_route(agent, "/v1/embeddings")
    assert pool.pick(Demand(True, route="/v1/embeddings")) is agent


def test_a_restarted_server_is_asked_again_for_routes_it_lacked(
    pool: AgentControllerPool,
) -> None:
    """It may have come back with --embeddings; and one that serves the route is believed."""
    lacking, session = join(pool, "lacking", address(1), status(idle=4))
    other, _ = join(pool, "other", address(2), status(idle=1))
    pool.lacks_route(lacking, "/v1/embeddings")
    pool.report(lacking, session, Status(state=LlamaCppState.LOADING))
    pool.report(lacking, session, status(idle=4))
    assert pool.pick(Demand(True, route="/v1/embeddings")) is lacking
    pool.lacks_route(lacking, "/v1/embeddings")
    pool.offers_route(lacking, "/v1/embeddings")
    assert pool.pick(Demand(True, route="/v1/embeddings")) is lacking
    assert other.lacking_routes == {}


def unreachable(error: str = "llama.cpp did not answer GET /health within 3s") -> Status:
    return Status(state=LlamaCppState.UNREACHABLE, error=error)


def test_an_unreachable_report_aborts_exactly_the_requests_running_on_that_agent(
    pool: AgentControllerPool,
) -> None:
    """Each guard of the agent whose llama.cpp became unreachable is aborted once, with the
    cause; other agents' guards are not, and releasing stays each block's job."""
    frozen, session = join(pool, "frozen", address(1), status(idle=3))
    healthy, _ = join(pool, "healthy", address(2), status(idle=1))
    aborted: list[tuple[int, str]] = []
    guards = [pool.reserve(frozen, Demand(True)), pool.reserve(frozen, Demand(False))]
    guards.append(pool.reserve(healthy, Demand(True)))
    for number, guard in enumerate(guards):
        guard.on_abort(lambda reason, number=number: aborted.append((number, reason)))
    done = pool.reserve(frozen, Demand(True))
    done.on_abort(lambda reason: aborted.append((99, reason)))
    done.release()

    pool.report(frozen, session, unreachable())
    pool.report(frozen, session, unreachable("still down"))  # no transition: nothing more

    assert sorted(number for number, _ in aborted) == [0, 1]
    assert all(
        reason == "frozen reported its llama.cpp unreachable "
        "(llama.cpp did not answer GET /health within 3s)"
        for _, reason in aborted
    )
    assert frozen.in_flight == 2  # aborted, not released
    for guard in guards:
        guard.release()
        guard.release()
    assert (frozen.in_flight, frozen.reserved) == (0, 0)
    assert (healthy.in_flight, healthy.reserved) == (0, 0)
    assert frozen.guards == set()
    assert healthy.guards == set()


def test_a_guard_aborted_before_its_action_is_attached_runs_it_when_attached(
    pool: AgentControllerPool,
) -> None:
    """A request granted a slot just before the report still learns of it when it sends."""
    agent, session = join(pool, "a", address(1), status(idle=1))
    guard = pool.reserve(agent, Demand(True))
    pool.report(agent, session, unreachable())
    reasons: list[str] = []
    guard.on_abort(reasons.append)
    assert reasons == [guard.aborted]
    assert guard.aborted is not None and guard.aborted.startswith("a reported")
    guard.release()
    guard.on_abort(reasons.append)  # released: nothing to end any more
    assert len(reasons) == 1


def test_agents_that_stop_reporting_or_load_leave_their_requests_running(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """An unreachable report aborts at once; a stale agent's removal, a takeover by a new
    session or a loading report say nothing, at once, of the requests llama.cpp is serving."""
    quiet, _ = join(pool, "quiet", address(1), status(idle=1))
    loading, session = join(pool, "loading", address(2), status(idle=1))
    guards = [pool.reserve(quiet, Demand(True)), pool.reserve(loading, Demand(True))]
    reasons: list[str] = []
    for guard in guards:
        guard.on_abort(reasons.append)
    pool.report(loading, session, status(idle=1, state=LlamaCppState.LOADING))
    pool.register("loading", address(2), status(idle=1))
    clock.now += 10
    pool.sweep(stale_after=5)
    assert reasons == []
    assert all(guard.aborted is None for guard in guards)


@dataclass
class Body:
    """A response's body stream, as ``silent_servers`` reads it."""

    total_bytes: int


def test_a_silent_agents_requests_that_receive_nothing_are_ended_and_flowing_ones_run_on(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """After a removal for silence, a request that receives no byte for another stale_after
    (before its headers, or mid-stream) is aborted; one whose bytes keep coming is not."""
    agent, _ = join(pool, "frozen", address(1), status(idle=3))
    waiting, stalled, flowing = (pool.reserve(agent, Demand(True)) for _ in range(3))
    flowing_body = Body(total_bytes=10)
    stalled.received, flowing.received = Body(total_bytes=10), flowing_body
    reasons: dict[str, str] = {}
    for name, guard in (("waiting", waiting), ("stalled", stalled), ("flowing", flowing)):
        guard.on_abort(lambda reason, name=name: reasons.setdefault(name, reason))
    clock.now += 6
    pool.sweep(stale_after=5)  # removed: watching starts
    assert agent.removed and reasons == {}
    for _ in range(6):
        clock.now += 1
        flowing_body.total_bytes += 100
        pool.sweep(stale_after=5)
    assert sorted(reasons) == ["stalled", "waiting"]
    assert reasons["stalled"] == "frozen stopped reporting and its llama.cpp sent nothing for 5s"
    assert flowing.aborted is None
    for guard in (waiting, stalled, flowing):
        guard.release()
    assert (agent.in_flight, agent.reserved) == (0, 0)


def test_requests_of_an_agent_that_left_by_closing_its_socket_are_not_watched(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """A socket that closes (an agent restarted) is no sign of a frozen host: a request waiting
    for a long answer there is never aborted for its silence."""
    agent, session = join(pool, "restarted", address(1), status(idle=1))
    guard = pool.reserve(agent, Demand(True))
    pool.remove(agent, session, "its connection closed")
    for _ in range(20):
        clock.now += 1
        pool.sweep(stale_after=5)
    assert guard.aborted is None
    guard.release()


def test_an_agent_back_at_its_address_proves_its_old_requests_alive(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """A silent agent that registers again (its host was only slow) leaves the requests of its
    earlier session running, whatever they receive."""
    agent, _ = join(pool, "slow", address(1), status(idle=1))
    guard = pool.reserve(agent, Demand(True))
    clock.now += 6
    pool.sweep(stale_after=5)
    assert agent.removed
    clock.now += 1
    join(pool, "slow", address(1), status(idle=1))
    for _ in range(20):
        clock.now += 1
        pool.sweep(stale_after=5)
    assert guard.aborted is None
    guard.release()


def test_a_reconnecting_agent_that_reports_unreachable_aborts_its_requests(
    pool: AgentControllerPool,
) -> None:
    """The takeover's first report counts like any other: unreachable ends what runs there."""
    agent, _ = join(pool, "a", address(1), status(idle=1))
    guard = pool.reserve(agent, Demand(True))
    pool.register("a", address(1), unreachable())
    assert guard.aborted is not None


def test_a_server_back_from_unreachable_is_used_again_after_the_cooldown(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """Aborted requests open its circuit; its first healthy report after the cooldown puts
    it back in rotation, with its reservations all given back."""
    agent, session = join(pool, "a", address(1), status(idle=2))
    guard = pool.reserve(agent, Demand(True))
    pool.report(agent, session, unreachable())
    pool.trip(agent, str(guard.aborted))  # what the proxy does with an aborted request
    guard.release()
    assert pool.pick(Demand(True)) is None
    clock.now += 1
    pool.report(agent, session, status(idle=2))
    assert pool.pick(Demand(True)) is None  # healthy, but the cooldown has not passed
    clock.now += 5
    pool.report(agent, session, status(idle=2))
    assert pool.pick(Demand(True)) is agent
    assert agent.free_slots() == 2


def test_an_unverified_agent_is_listed_but_counts_for_nothing(pool: AgentControllerPool) -> None:
    """Before the balancer reached it, an agent has no slots, is not usable and is never picked."""
    agent, _ = pool.register("rogue", address(1), status(idle=60000))
    fleet = pool.snapshot()
    assert (fleet.slots_idle, fleet.slots_processing, fleet.usable_agents) == (0, 0, 0)
    [listed] = fleet.agents
    assert (listed.verified, listed.slots_total, listed.slots_idle) == (False, 0, 0)
    assert listed.verification is not None
    assert pool.pick(Demand(True)) is None
    assert pool.has_candidates(())  # it may yet be verified: requests wait for it
    assert pool.unverified(agent, "the balancer cannot reach it: refused")
    assert pool.snapshot().agents[0].verification == "the balancer cannot reach it: refused"


def test_a_verified_agent_counts_at_most_its_bound(pool: AgentControllerPool) -> None:
    """Once verified, the agent's reports count, within the slot bound it was verified with."""
    woken: list[None] = []
    pool.on_capacity(lambda _agent: woken.append(None))
    agent, session = pool.register("boaster", address(1), status(idle=60000))
    woken.clear()
    assert pool.verified(agent, 4, "/props total_slots=4", session=session)
    assert woken  # waiting requests may now be served
    fleet = pool.snapshot()
    assert (fleet.slots_idle, fleet.usable_agents) == (4, 1)
    assert pool.pick(Demand(True)) is agent
    assert pool.report(agent, session, status(idle=1, processing=1))
    assert pool.snapshot().slots_idle == 1
    assert pool.snapshot().agents[0].verification == "/props total_slots=4"


def test_a_verification_for_an_ended_session_changes_nothing(pool: AgentControllerPool) -> None:
    """A verifier of an older socket cannot verify the agent its newer socket took over, nor a
    removed one."""
    agent, old = pool.register("a", address(1), status(idle=2))
    pool.register("a", address(1), status(idle=2))
    assert not pool.verified(agent, 2, session=old)
    assert not agent.verified
    assert pool.remove(agent, None, "test")
    assert not pool.verified(agent, 2)
    assert not pool.unverified(agent, "gone")


def test_a_re_registration_at_the_same_address_keeps_its_verification(
    pool: AgentControllerPool,
) -> None:
    """An agent reconnecting for the address the balancer already reached stays counted."""
    agent, _ = join(pool, "a", address(1), status(idle=2), slot_bound=2)
    again, session = pool.register("a", address(1), status(idle=2))
    assert again is agent
    assert pool.snapshot().slots_idle == 2
    assert pool.unverified(again, "a later check failed", session=session)
    assert pool.snapshot().slots_idle == 2


def test_models_claimed_by_an_unverified_agent_are_not_served_or_listed(
    pool: AgentControllerPool,
) -> None:
    """A rogue claiming a second model cannot make a one-model fleet refuse unknown names."""
    good, _ = join(
        pool, "good", address(1), Status(state=LlamaCppState.OK, slots_idle=1, models=("tiny",))
    )
    rogue, session = pool.register(
        "rogue", address(2), Status(state=LlamaCppState.OK, slots_idle=9, models=("other",))
    )
    assert pool.accepts("any-name")
    assert pool.model_ids() == ["tiny"]
    assert list(pool.models()) == ["tiny"]
    assert pool.verified(rogue, 9, session=session)
    assert pool.model_ids() == ["other", "tiny"]
    assert not pool.accepts("any-name")
    assert good.serves("tiny")
