"""Routing policies: prefix stickiness weighed against load, waiting only when measured cheaper,
hot prefixes spilling over, learning from llama.cpp's cache reports, and model filtering."""

from __future__ import annotations

import asyncio

import pytest

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.fleet.request_buffer import BufferFull, RequestBuffer
from paddler.balancer.routing.cache_report import CacheReport
from paddler.balancer.routing.policies import Demand, PrefixPolicy, SlotsPolicy
from paddler.balancer.routing.prefix_index import BLOCK_CHARS, PrefixIndex
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join

SYSTEM = "s" * (BLOCK_CHARS * 12)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(idle: int, processing: int = 0, models: tuple[str, ...] = ()) -> Status:
    return Status(
        state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing, models=models
    )


def address(port: int) -> Address:
    return Address("http", "127.0.0.1", port)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy() -> PrefixPolicy:
    return PrefixPolicy(PrefixIndex(1024 * 1024))


@pytest.fixture
def pool(clock: Clock, policy: PrefixPolicy) -> AgentControllerPool:
    return AgentControllerPool(policy=policy, clock=clock)


def demand(prompt: str, model: str | None = None) -> Demand:
    return Demand.of(True, model, prompt)


def measured(agent: AgentController, *, prefill_rate: float, slot_hold: float) -> None:
    agent.prefill_rate = prefill_rate
    agent.slot_hold = slot_hold


def send(pool: AgentControllerPool, request: Demand) -> AgentController:
    """Pick and reserve, as the buffer does; fail if the policy chose to wait."""
    agent = pool.pick(request)
    assert agent is not None
    pool.reserve(agent, request)
    return agent


def test_a_prompt_goes_back_to_the_agent_that_holds_its_prefix(pool: AgentControllerPool) -> None:
    """A conversation's next turn goes where its previous turn went, whatever the tie-break."""
    for port, name in enumerate(("a", "b", "c"), start=1):
        join(pool, name, address(port), status(idle=4))
    first = send(pool, demand(SYSTEM + "user: hello"))
    for agent in pool.agents():
        agent.reserved = 0
        pool.changed(agent)
    # Make the first agent the least attractive by load alone: it still wins on the prefix.
    first.reserved = 2
    pool.changed(first)
    follow_up = demand(SYSTEM + "user: hello" + "assistant: hi" + "user: more" * 20)
    assert send(pool, follow_up) is first
    assert follow_up.match.blocks >= 12


def test_new_prefixes_spread_over_the_fleet(pool: AgentControllerPool) -> None:
    """Distinct prompts on an idle fleet go to the agent that was sent the least so far, so
    that each server's cache gets its share instead of one server getting every prefix."""
    join(pool, "a", address(1), status(idle=4))
    join(pool, "b", address(2), status(idle=4))
    chosen = []
    for number in range(6):
        agent = send(pool, demand(f"{number:04d}" * (BLOCK_CHARS * 2)))
        agent.reserved = 0
        pool.changed(agent)
        chosen.append(agent.name)
    assert chosen.count("a") == 3
    assert chosen.count("b") == 3


def test_a_full_sticky_agent_is_not_waited_for_before_anything_is_measured(
    pool: AgentControllerPool,
) -> None:
    """Without measured prefill rates and slot times, waiting cannot be shown to be cheaper:
    the request goes to the free agent at once."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=1))
    assert send(pool, demand(SYSTEM + "turn 1")) is a
    follow_up = demand(SYSTEM + "turn 1" + "turn 2")
    assert send(pool, follow_up) is b
    assert follow_up.waiting_for is None


def test_a_full_sticky_agent_is_waited_for_when_measured_cheaper(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """Recomputing 1536 prompt tokens at 100 tokens/s elsewhere (15 s) is dearer than waiting
    for one of the sticky agent's slots (0.5 s): the request waits, but never longer than the
    saving, after which it goes to the free agent."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=1))
    for agent in (a, b):
        measured(agent, prefill_rate=100.0, slot_hold=0.5)
    assert send(pool, demand(SYSTEM + "turn 1")) is a
    follow_up = demand(SYSTEM + "turn 1" + "turn 2")
    assert pool.pick(follow_up) is None
    assert follow_up.waiting_for is a
    assert a.awaited == 1
    assert follow_up.revisit_at is not None
    saving = follow_up.revisit_at - clock.now
    assert 10 < saving < 20
    clock.now += saving
    assert pool.pick(follow_up) is b
    assert a.awaited == 0


def test_waiting_is_not_chosen_when_recomputing_is_cheaper(pool: AgentControllerPool) -> None:
    """A fast prefill (1536 tokens at 100k tokens/s) beats waiting for a slot held 10 s."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=1))
    for agent in (a, b):
        measured(agent, prefill_rate=100_000.0, slot_hold=10.0)
    assert send(pool, demand(SYSTEM + "turn 1")) is a
    assert send(pool, demand(SYSTEM + "turn 1" + "turn 2")) is b


def test_a_hot_prefix_spills_over_once_its_queue_makes_waiting_dearer(
    pool: AgentControllerPool,
) -> None:
    """Every request shares one long prefix held by a full agent. The expected wait grows with
    each request already waiting for it, so after a few, one goes to the idle agent, which
    then holds the prefix too, and both share the load from then on."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=4))
    for agent in (a, b):
        measured(agent, prefill_rate=1000.0, slot_hold=1.0)
    assert send(pool, demand(SYSTEM + "first")) is a
    waiting = []
    for number in range(10):
        request = demand(SYSTEM + f"question {number}")
        agent = pool.pick(request)
        if agent is not None:
            break
        waiting.append(request)
    else:
        pytest.fail("every request waited for the hot agent")
    assert agent is b
    assert 0 < len(waiting) < 3
    pool.reserve(agent, request)
    # The idle agent now holds the prefix: the next request goes there without waiting.
    assert pool.pick(demand(SYSTEM + "another question")) is b


def test_learning_from_cache_reports_exports_actual_and_predicted_hits(
    pool: AgentControllerPool, policy: PrefixPolicy
) -> None:
    """cache_n and prompt_n from llama.cpp are counted as they are; the prediction is the
    index's match in tokens; prefill speed is measured per agent."""
    a, _ = join(pool, "a", address(1), status(idle=2))
    first = demand(SYSTEM + "turn 1")
    send(pool, first)
    policy.learn(a, first, CacheReport(cached_tokens=0, computed_tokens=1542, prompt_seconds=1.0))
    second = demand(SYSTEM + "turn 1" + "turn 2")
    send(pool, second)
    policy.learn(a, second, CacheReport(cached_tokens=1541, computed_tokens=7, prompt_seconds=0.1))
    stats = policy.stats
    assert stats.prompt_tokens == 1542 + 1548
    assert stats.cached_tokens == 1541
    assert stats.predicted_cached_tokens == pytest.approx(1536, rel=0.01)
    actual, predicted = stats.recent_hit_ratio()
    assert actual == pytest.approx(1541 / 3090)
    assert predicted == pytest.approx(1536 / 3090, rel=0.01)
    assert a.prefill_rate == pytest.approx(1542.0)
    assert stats.decisions == {"load": 1, "prefix": 1}


def test_a_miss_reported_by_llamacpp_stops_predictions_for_what_it_evicted(
    pool: AgentControllerPool, policy: PrefixPolicy
) -> None:
    """After llama.cpp reports that an old prefix was no longer cached, prefixes at least that
    old on that agent no longer count as matches."""
    a, _ = join(pool, "a", address(1), status(idle=2))
    old = demand(SYSTEM + "old conversation")
    send(pool, old)
    for number in range(5):
        send(pool, demand(f"{number}" * len(SYSTEM)))
        a.reserved = 0
        pool.changed(a)
    again = demand(SYSTEM + "old conversation, again")
    a.reserved = 0
    pool.changed(a)
    send(pool, again)
    assert again.match.blocks == 12
    # llama.cpp had evicted it: nothing was cached.
    policy.learn(a, again, CacheReport(cached_tokens=0, computed_tokens=1560, prompt_seconds=1))
    assert policy.index.retention(a.cache_key) < max(again.match.ages)
    # Five fresh prompts later, the conversation is as old as the evicted one was: no match.
    for number in range(5, 10):
        a.reserved = 0
        pool.changed(a)
        send(pool, demand(f"{number}" * len(SYSTEM)))
    a.reserved = 0
    pool.changed(a)
    third = demand(SYSTEM + "old conversation, third time")
    send(pool, third)
    assert third.match.blocks == 0


def test_an_agent_that_restarts_loses_its_prefixes(
    pool: AgentControllerPool, policy: PrefixPolicy
) -> None:
    """A report that llama.cpp is loading again means its cache is gone."""
    a, session = join(pool, "a", address(1), status(idle=2))
    b, _ = join(pool, "b", address(2), status(idle=2))
    assert send(pool, demand(SYSTEM + "turn 1")) is a
    a.reserved = 0
    pool.changed(a)
    pool.report(a, session, Status(state=LlamaCppState.LOADING))
    pool.report(a, session, status(idle=2))
    b.reserved = 1  # b is busier, so only a prefix match would send the request to a
    pool.changed(b)
    request = demand(SYSTEM + "turn 1" + "turn 2")
    send(pool, request)
    assert request.match.blocks == 0


def test_only_agents_serving_the_named_model_are_candidates(pool: AgentControllerPool) -> None:
    """A model name restricts the pick; no name means any agent; unknown names are detected."""
    join(pool, "alpha", address(1), status(idle=1, models=("alpha",)))
    beta, _ = join(pool, "beta", address(2), status(idle=4, models=("beta", "beta-alias")))
    alpha = pool.pick(Demand(True, "alpha"))
    assert alpha is not None
    assert alpha.name == "alpha"
    assert pool.pick(Demand(True, "beta-alias")) is beta
    assert pool.pick(Demand(True)) is beta
    assert pool.knows("alpha")
    assert pool.accepts("alpha")
    assert not pool.knows("gamma")
    assert not pool.accepts("gamma")
    assert pool.pick(Demand(True, "gamma")) is None
    assert sorted(pool.models()) == ["alpha", "beta", "beta-alias"]
    alpha.reserved = 1
    pool.changed(alpha)
    assert pool.pick(Demand(True, "alpha")) is None


def test_an_empty_fleet_accepts_any_model_so_that_it_can_scale_from_zero() -> None:
    """Before any agent reported a model, a named model may still arrive: requests wait."""
    pool = AgentControllerPool(policy=SlotsPolicy())
    assert pool.accepts("anything")
    join(pool, "loading", address(1), Status(state=LlamaCppState.LOADING))
    assert pool.accepts("anything")


async def test_buffering_is_per_model(clock: Clock) -> None:
    """Model alpha's full slots and full buffer never hold back model beta's requests."""
    pool = AgentControllerPool(policy=SlotsPolicy(), clock=clock)
    join(pool, "alpha", address(1), status(idle=1, models=("alpha",)))
    join(pool, "beta", address(2), status(idle=1, models=("beta",)))
    buffer = RequestBuffer(pool, size=1, timeout=5)
    holder = await buffer.acquire(Demand(True, "alpha"))
    waiting_alpha = asyncio.create_task(buffer.acquire(Demand(True, "alpha")))
    await asyncio.sleep(0)
    assert buffer.waiting_for("alpha") == 1
    with pytest.raises(BufferFull, match="alpha"):
        await buffer.acquire(Demand(True, "alpha"))
    # Beta is served at once although alpha's request waits ahead of it.
    beta = await asyncio.wait_for(buffer.acquire(Demand(True, "beta")), timeout=1)
    assert beta.agent.name == "beta"
    # And beta may buffer its own request while alpha's buffer is full.
    waiting_beta = asyncio.create_task(buffer.acquire(Demand(True, "beta")))
    await asyncio.sleep(0)
    assert buffer.waiting_for("beta") == 1
    holder.release()
    assert (await asyncio.wait_for(waiting_alpha, timeout=1)).agent.name == "alpha"
    beta.release()
    assert (await asyncio.wait_for(waiting_beta, timeout=1)).agent.name == "beta"


async def test_the_buffer_decides_again_when_a_waiting_request_asked_to(
    pool: AgentControllerPool, clock: Clock
) -> None:
    """A request waiting for its sticky agent is dispatched elsewhere when its patience runs
    out, without any slot freeing up: the buffer revisits it at the time the policy named."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=1))
    # Recomputing the prefix elsewhere takes about 15 ms, waiting for a slot here about 5 ms.
    for agent in (a, b):
        measured(agent, prefill_rate=100_000.0, slot_hold=0.005)
    buffer = RequestBuffer(pool, size=10, timeout=5)
    first = await buffer.acquire(demand(SYSTEM + "turn 1"))
    assert first.agent is a
    follow_up = asyncio.create_task(buffer.acquire(demand(SYSTEM + "turn 1" + "turn 2")))
    await asyncio.sleep(0)
    assert buffer.waiting == 1
    clock.now += 1.0  # the pool's clock says the patience is over; the loop's timer fires
    guard = await asyncio.wait_for(follow_up, timeout=2)
    assert guard.agent is b
    assert a.awaited == 0


async def test_a_waiting_request_that_gives_up_is_no_longer_counted_as_waiting(
    pool: AgentControllerPool,
) -> None:
    """Cancelling a request that waits for its sticky agent takes it out of that agent's
    queue estimate."""
    a, _ = join(pool, "a", address(1), status(idle=1))
    b, _ = join(pool, "b", address(2), status(idle=1))
    for agent in (a, b):
        measured(agent, prefill_rate=100.0, slot_hold=0.5)
    buffer = RequestBuffer(pool, size=10, timeout=5)
    await buffer.acquire(demand(SYSTEM + "turn 1"))
    waiter = asyncio.create_task(buffer.acquire(demand(SYSTEM + "turn 1" + "turn 2")))
    await asyncio.sleep(0)
    assert a.awaited == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert a.awaited == 0
    assert buffer.waiting == 0


async def test_model_names_cannot_multiply_the_buffer_of_a_fleet_without_models(
    clock: Clock,
) -> None:
    """An empty fleet accepts every model name (it may be scaling from zero), but inventing
    names does not buy more room: the whole buffer is bounded too."""
    pool = AgentControllerPool(policy=SlotsPolicy(), clock=clock)
    buffer = RequestBuffer(pool, size=2, timeout=5)
    waiting = [
        asyncio.create_task(buffer.acquire(Demand(True, f"model-{number}"))) for number in range(2)
    ]
    await asyncio.sleep(0)
    assert buffer.waiting == 2
    with pytest.raises(BufferFull):
        await buffer.acquire(Demand(True, "model-3"))
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert buffer.waiting == 0


def test_without_a_shared_prefix_the_less_busy_agent_wins_whatever_its_measured_speed(
    pool: AgentControllerPool,
) -> None:
    """Prefill speeds measured under different concurrency differ by chance; they must not pull
    a prompt that nobody holds to a busier server."""
    a, _ = join(pool, "a", address(1), status(idle=4))
    b, _ = join(pool, "b", address(2), status(idle=4))
    measured(a, prefill_rate=3000.0, slot_hold=1.0)
    measured(b, prefill_rate=1000.0, slot_hold=1.0)
    a.reserved = 1
    pool.changed(a)
    assert send(pool, demand("x" * (BLOCK_CHARS * 10))) is b


async def test_a_freed_slot_goes_to_a_request_that_wants_that_server_before_any_spills(
    pool: AgentControllerPool,
) -> None:
    """Two requests wait, each for the full server that holds its conversation. When one of
    those servers frees a slot, the request that wants it gets it, even though the other
    request arrived first and would rather spill there than wait: under load a spill only
    trades one cache hit for another's miss."""
    x, _ = join(pool, "x", address(1), status(idle=1))
    y, _ = join(pool, "y", address(2), status(idle=1))
    for agent in (x, y):
        measured(agent, prefill_rate=1000.0, slot_hold=100.0)
    buffer = RequestBuffer(pool, size=10, timeout=5)
    on_x = await buffer.acquire(demand(SYSTEM + "conversation on x"))
    on_y = await buffer.acquire(demand("y" * len(SYSTEM) + "conversation on y"))
    assert (on_x.agent, on_y.agent) == (x, y)
    wants_x = asyncio.create_task(buffer.acquire(demand(SYSTEM + "conversation on x, again")))
    await asyncio.sleep(0)
    wants_y = asyncio.create_task(
        buffer.acquire(demand("y" * len(SYSTEM) + "conversation on y, again"))
    )
    await asyncio.sleep(0)
    assert buffer.waiting == 2
    on_y.release()
    guard = await asyncio.wait_for(wants_y, timeout=1)
    assert guard.agent is y
    assert not wants_x.done()
    on_x.release()
    assert (await asyncio.wait_for(wants_x, timeout=1)).agent is x
