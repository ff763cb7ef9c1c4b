"""The capacity index: a pick among a thousand agents looks at the few that can win, and the
order and the fleet's totals follow every reservation, release and report."""

from __future__ import annotations

from collections.abc import Sequence

from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.routing.policies import (
    PREFIX_BREADTH,
    Demand,
    PrefixPolicy,
    SlotsPolicy,
    least_loaded,
)
from paddler.balancer.routing.prefix_index import BLOCK_CHARS, PrefixIndex
from paddler.config import Address
from paddler.protocol import LlamaCppState, Status
from tests.support.pool import join

FLEET = 1000


def status(idle: int, processing: int = 0, models: tuple[str, ...] = ()) -> Status:
    return Status(
        state=LlamaCppState.OK, slots_idle=idle, slots_processing=processing, models=models
    )


Shown = list[list[AgentController]]


def counting(policy: SlotsPolicy | PrefixPolicy) -> Shown:
    """Keep, for each choice ``policy`` makes from now on, the candidates it was shown."""
    shown: Shown = []
    choose = policy.choose

    def counted(
        candidates: Sequence[AgentController],
        demand: Demand,
        now: float,
        *,
        spill: bool = True,
    ) -> AgentController | None:
        shown.append(list(candidates))
        return choose(candidates, demand, now, spill=spill)

    policy.choose = counted  # type: ignore[method-assign]
    return shown


def prefix_policy() -> PrefixPolicy:
    return PrefixPolicy(PrefixIndex(16 * 1024 * 1024))


def fleet(pool: AgentControllerPool, size: int = FLEET) -> list[AgentController]:
    agents = []
    for number in range(size):
        model = ("even",) if number % 2 == 0 else ("odd",)
        agent, _ = join(
            pool,
            f"agent-{number:04d}",
            Address("http", "127.0.0.1", 1 + number),
            status(4, 0, model),
        )
        agents.append(agent)
    return agents


def test_a_pick_among_a_thousand_agents_shows_the_policy_one() -> None:
    """The slots policy's choice is the first agent of the index: a pick hands it that one
    candidate, and it is the agent a walk of the whole fleet would have chosen."""
    slots = SlotsPolicy()
    shown = counting(slots)
    pool = AgentControllerPool(policy=slots)
    agents = fleet(pool)
    for number, agent in enumerate(agents[:300]):
        pool.reserve(agent, Demand(True))
        if number % 3 == 0:
            pool.reserve(agent, Demand(True))
    for _ in range(50):
        picked = pool.pick(Demand(True))
        assert picked is least_loaded(pool.agents(), True)
        assert picked is not None
        pool.reserve(picked, Demand(True))
    assert {len(candidates) for candidates in shown} == {1}


def test_a_report_moves_its_agent_in_the_order() -> None:
    """An agent whose report shows more free slots than anyone's becomes the next pick, and
    one whose report shows none falls behind every agent with room."""
    pool = AgentControllerPool()
    agents = fleet(pool, 10)
    roomy, _ = join(pool, "roomy", Address("http", "127.0.0.1", 99), status(1))
    assert pool.pick(Demand(True)) is not roomy
    assert pool.report(roomy, roomy.session_id, status(16))
    assert pool.pick(Demand(True)) is roomy
    for agent in agents:
        assert pool.report(agent, agent.session_id, status(0, 4))
    assert pool.report(roomy, roomy.session_id, status(0, 16))
    assert pool.pick(Demand(True)) is None
    assert pool.report(agents[7], agents[7].session_id, status(1, 3))
    assert pool.pick(Demand(True)) is agents[7]


def test_a_pick_for_a_model_looks_only_at_the_agents_that_serve_it() -> None:
    """Agents are indexed by each model name they answer to: a request for "odd" goes to an
    odd agent even when every even agent has more room."""
    pool = AgentControllerPool()
    agents = fleet(pool, 20)
    for agent in agents[1::2]:
        pool.reserve(agent, Demand(True))
    picked = pool.pick(Demand(True, model="odd"))
    assert picked is not None and picked.serves("odd")
    assert pool.has_free("odd")
    for agent in agents[1::2]:
        for _ in range(3):
            pool.reserve(agent, Demand(True))
    assert pool.pick(Demand(True, model="odd")) is None
    assert not pool.has_free("odd")
    assert pool.has_free("even")


def test_the_totals_follow_reservations_releases_reports_and_removals() -> None:
    """``/health``'s totals are kept as agents change, and match a walk of the fleet."""
    pool = AgentControllerPool()
    agents = fleet(pool, 30)

    def walked() -> tuple[int, int, int]:
        usable = [agent for agent in pool.agents() if agent.usable()]
        return (
            len(usable),
            sum(agent.free_slots() for agent in usable),
            sum(min(agent.busy_slots(), agent.slots_total) for agent in usable),
        )

    def kept() -> tuple[int, int, int]:
        totals = pool.totals()
        return totals.usable_agents, totals.slots_idle, totals.slots_processing

    guards = [pool.reserve(agent, Demand(True)) for agent in agents[:10]]
    assert kept() == walked() == (30, 110, 10)
    guards[0].release()
    guards[1].release(abandoned=True)
    assert kept() == walked()
    pool.report(agents[2], agents[2].session_id, status(0, 6))
    pool.trip(agents[3], "test")
    pool.remove(agents[4], None, "test")
    assert kept() == walked() == (28, 102, 12)


def test_the_prefix_policy_compares_the_prompts_owners_with_the_best_ranked() -> None:
    """A follow-up turn is compared across the server that holds its conversation and a few of
    the best-ranked others, not across the fleet, and still goes back to its server."""
    policy = prefix_policy()
    shown_all = counting(policy)
    pool = AgentControllerPool(policy=policy)
    agents = fleet(pool)
    conversation = "c" * (BLOCK_CHARS * 8)
    holder = agents[613]
    pool.reserve(holder, Demand.of(True, None, conversation))
    for agent in agents[:600]:
        pool.reserve(agent, Demand(True))
    follow_up = Demand.of(True, None, conversation + "next turn" * 40)
    assert pool.pick(follow_up) is holder
    shown = shown_all[-1]
    assert holder in shown
    assert len(shown) <= PREFIX_BREADTH + 1


def test_new_prefixes_spread_over_a_large_idle_fleet() -> None:
    """Prompts nobody holds go where the fewest prompt characters were sent, so that on an idle
    fleet of a thousand servers a hundred new conversations land on a hundred servers."""
    pool = AgentControllerPool(policy=prefix_policy())
    fleet(pool)
    chosen = set()
    for number in range(100):
        demand = Demand.of(True, None, f"{number:05d}" * (BLOCK_CHARS * 2))
        agent = pool.pick(demand)
        assert agent is not None
        guard = pool.reserve(agent, demand)
        guard.release()
        chosen.add(agent.name)
    assert len(chosen) == 100


def test_an_agent_renamed_by_a_new_registration_is_ranked_by_its_new_name() -> None:
    """Among agents with as many free and busy slots the name breaks the tie: an agent that
    registers again at its address under another name takes the rank of that name."""
    pool = AgentControllerPool()
    first, _ = join(pool, "a", Address("http", "127.0.0.1", 1), status(idle=2))
    second, _ = join(pool, "b", Address("http", "127.0.0.1", 2), status(idle=2))
    assert pool.pick(Demand(True)) is first
    renamed, _ = join(pool, "c", Address("http", "127.0.0.1", 1), status(idle=2))
    assert renamed is first and renamed.name == "c"
    assert pool.pick(Demand(True)) is second
    assert pool.pick(Demand(True)) is least_loaded([first, second], True)
