"""The routing benchmark's workloads: deterministic, and shaped the way the benchmark relies on."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from bench.cache_sizing import size_cache
from bench.routing_config import MODEL
from bench.workloads import WORKLOADS, ChatShape, arrivals, generate


@pytest.mark.parametrize("workload", WORKLOADS)
def test_the_same_seed_gives_the_same_requests_at_the_same_times(workload: str) -> None:
    """Every contestant can be sent the identical sequence, generated anew from the seed."""
    first = generate(workload, 7, 50, 2.0)
    again = generate(workload, 7, 50, 2.0)
    assert [(r.at, r.body()) for r in first] == [(r.at, r.body()) for r in again]
    other = generate(workload, 8, 50, 2.0)
    assert [r.body() for r in first] != [r.body() for r in other]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_higher_rate_sends_the_same_requests_sooner(workload: str) -> None:
    """Offered loads differ only in pace: requests and the arrival pattern stay the same."""
    slow, fast = generate(workload, 3, 40, 1.0), generate(workload, 3, 40, 4.0)
    assert [r.body() for r in slow] == [r.body() for r in fast]
    assert [r.at / 4 for r in slow] == pytest.approx([r.at for r in fast])


def test_arrivals_are_poisson_at_exactly_the_asked_rate() -> None:
    """All arrivals fall within count/rate seconds, and their gaps are exponential: the mean
    is 1/rate, and about 1/e of them are longer than that."""
    offsets = arrivals(1, "chat", 4000, 2.0)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets == sorted(offsets)
    assert offsets[0] >= 0 and offsets[-1] <= 2000
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.05)
    assert sum(gap > 0.5 for gap in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.03)


def test_each_chat_turn_extends_the_previous_turn_of_its_session() -> None:
    """A session's prompt is its previous prompt, the assistant's reply and a new user turn."""
    shape = ChatShape(lanes=16, turns=6)
    requests = generate("chat", 5, 300, 1.0, shape)
    last: dict[int, tuple[dict[str, str], ...]] = {}
    for request in requests:
        assert request.session is not None
        messages = request.messages
        assert messages[-1]["role"] == "user"
        assert json.loads(request.body())["ignore_eos"] is True
        previous = last.get(request.session)
        if previous is None:
            assert [message["role"] for message in messages] == ["system", "user"]
        else:
            assert messages[: len(previous)] == previous
            assert [message["role"] for message in messages[len(previous) :]] == [
                "assistant",
                "user",
            ]
        last[request.session] = messages
    turns = [len(messages) // 2 for messages in last.values()]
    assert max(turns) == shape.turns


def test_every_chat_session_has_its_own_long_system_prompt() -> None:
    """No two sessions share a system prompt, so only routing can bring a session's cache back."""
    requests = generate("chat", 5, 300, 1.0, ChatShape(lanes=16, turns=6))
    system = {request.session: request.messages[0]["content"] for request in requests}
    assert len(system) > 16
    assert len(set(system.values())) == len(system)
    assert all(1400 <= len(prompt) <= 1600 for prompt in system.values())
    prefixes = {prompt[:32] for prompt in system.values()}
    assert len(prefixes) == len(system)


def test_lanes_come_round_in_a_varied_order() -> None:
    """Each arrival serves one of the longest idle half of the lanes: a lane's turns are at
    least ``lanes / 2`` and on average ``lanes`` arrivals apart, and the gaps vary, so that no
    fixed cycle gives round robin affinity by accident."""
    shape = ChatShape(lanes=16, turns=6)
    requests = generate("chat", 2, 400, 1.0, shape)
    seen: dict[str, int] = {}
    gaps = []
    for index, request in enumerate(requests):
        system = request.messages[0]["content"]
        if system in seen:
            gaps.append(index - seen[system])
        seen[system] = index
    assert min(gaps) >= 8
    assert sum(gaps) / len(gaps) == pytest.approx(16, abs=0.5)
    assert len(set(gaps)) >= 8
    assert sum(gap % 2 for gap in gaps) / len(gaps) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("workload", ["independent", "mixed"])
def test_independent_prompts_share_no_prefix(workload: str) -> None:
    """Nothing in (b) or (c) can be reused from a cache, whatever the routing."""
    requests = generate(workload, 9, 200, 1.0)
    prompts = [request.messages[0]["content"] for request in requests]
    assert all(len(request.messages) == 1 for request in requests)
    assert len({prompt[:8] for prompt in prompts}) == len(prompts)


def test_mixed_generations_are_mostly_short_and_some_long() -> None:
    """(c): about one request in five asks for the long generation."""
    tokens = [request.max_tokens for request in generate("mixed", 4, 1000, 1.0)]
    assert set(tokens) == {16, 256}
    assert 0.15 < tokens.count(256) / len(tokens) < 0.25


def test_the_cache_fits_a_share_of_the_sessions_but_not_all() -> None:
    """Each server is sized for more than its share of the lanes and fewer than all of them."""
    shape = ChatShape(lanes=16, turns=6)
    sizing = size_cache(generate("chat", 1, 384, 1.0, shape), 16, 2, MODEL)
    assert 8 < sizing.sessions_per_server < 16
    held = sizing.cache_ram_mib / sizing.mean_state_mib + 1
    assert 8 < held < 16
    with pytest.raises(ValueError, match="every session"):
        size_cache(generate("chat", 1, 384, 1.0, ChatShape(lanes=2)), 2, 2, MODEL)
