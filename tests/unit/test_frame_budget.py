"""The per-socket frame budget: a burst, then the sustained rate, and a flood noticed in time."""

from __future__ import annotations

import pytest

from paddler.balancer.management.frame_budget import FrameBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_frames_wait_their_turn() -> None:
    """The first ``burst`` frames pass at once; the next waits one frame's worth of time."""
    clock = Clock()
    budget = FrameBudget(rate=20, burst=3, flood_seconds=5, clock=clock)
    assert [budget.take() for _ in range(3)] == [0, 0, 0]
    assert budget.take() == pytest.approx(0.05)


def test_frames_at_the_sustained_rate_never_wait() -> None:
    """An agent that stays at the rate (as the real one does) is never throttled."""
    clock = Clock()
    budget = FrameBudget(rate=20, burst=1, flood_seconds=5, clock=clock)
    for _ in range(1000):
        assert budget.take() == 0
        clock.now += 0.05
    assert not budget.flooding()


def test_a_socket_over_budget_without_a_pause_is_flooding_after_the_limit() -> None:
    """Throttled frame after frame for ``flood_seconds``: flooding; a pause forgives it."""
    clock = Clock()
    budget = FrameBudget(rate=10, burst=1, flood_seconds=2, clock=clock)
    budget.take()
    for _ in range(19):  # always one frame queued: each waits its turn, then the next comes
        clock.now += budget.take()
    assert not budget.flooding()
    clock.now += budget.take()
    clock.now += budget.take()
    assert budget.flooding()
    clock.now += 1.0  # the agent paused: tokens came back
    assert budget.take() == 0
    assert not budget.flooding()


@pytest.mark.parametrize(
    ("rate", "burst", "flood_seconds"), [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-1, 1, 1)]
)
def test_a_budget_needs_positive_numbers(rate: float, burst: int, flood_seconds: float) -> None:
    """A rate, burst or flood limit of zero or less is refused."""
    with pytest.raises(ValueError, match="a frame budget needs"):
        FrameBudget(rate=rate, burst=burst, flood_seconds=flood_seconds)
