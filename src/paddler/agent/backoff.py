"""Exponential backoff with jitter, for reconnecting and for restarting crashed children."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each shortened by up to ``jitter``.

    Jitter keeps a fleet of agents that lost the same balancer from reconnecting in lockstep.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        jitter: float = 0.2,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self._initial = initial
        self._maximum = maximum
        self._jitter = jitter
        self._random_fraction = random_fraction
        self._current = initial

    def next_delay(self) -> float:
        """Return the delay to wait now, and double the one after it."""
        delay = self._current * (1 - self._jitter * self._random_fraction())
        self._current = min(self._current * 2, self._maximum)
        return delay

    def reset(self) -> None:
        self._current = self._initial
