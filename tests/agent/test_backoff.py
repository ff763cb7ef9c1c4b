"""Backoff: doubling delays, the cap, jitter and reset."""

from __future__ import annotations

import pytest

from paddler.agent.backoff import Backoff


def test_backoff_doubles_up_to_its_maximum_without_jitter() -> None:
    """Delays double from the initial one and stay at the maximum."""
    backoff = Backoff(0.2, 1.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_jitter_only_ever_shortens_a_delay() -> None:
    """With full randomness the delay shrinks by the jitter fraction, never grows past the cap."""
    backoff = Backoff(1.0, 1.0, jitter=0.25, random_fraction=lambda: 1.0)
    assert backoff.next_delay() == pytest.approx(0.75)


def test_backoff_starts_over_after_a_reset() -> None:
    """reset() brings the next delay back to the initial one."""
    backoff = Backoff(0.2, 10.0, jitter=0.0)
    backoff.next_delay()
    backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.2)
