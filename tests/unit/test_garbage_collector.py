"""``cli.process.settle_garbage_collector``: what the balancer does to the collector once it
has started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from paddler.cli.process import (
    OLD_COLLECTION_AFTER,
    YOUNG_COLLECTION_EVERY,
    settle_garbage_collector,
)


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The test process's collector as it was, whatever the test did to it."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_collector")
def test_startup_objects_are_frozen_and_full_collections_stay_once_per_million() -> None:
    """Every object that exists then moves out of later collections; a middle collection
    walks at most eleven young thresholds' worth, and a full one still comes after about a
    million net allocations, as with Python's default thresholds scaled to a young one of
    10,000."""
    _, middle, _ = gc.get_threshold()
    settle_garbage_collector()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, middle, OLD_COLLECTION_AFTER)
    assert YOUNG_COLLECTION_EVERY * (middle + 1) <= 11_000
    assert YOUNG_COLLECTION_EVERY * middle * OLD_COLLECTION_AFTER == 1_000_000


@pytest.mark.usefixtures("restored_collector")
def test_cycles_made_after_settling_are_still_collected() -> None:
    """Freezing keeps startup objects out, not new garbage: a cycle made later is freed."""
    settle_garbage_collector()

    class Node:
        partner: object = None

    first, second = Node(), Node()
    first.partner, second.partner = second, first
    del first, second
    assert gc.collect() >= 2
