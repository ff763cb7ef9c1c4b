"""StatusBoard: versions, change detection and waking readers."""

from __future__ import annotations

import asyncio

import pytest

from paddler.agent.status_board import StatusBoard
from paddler.protocol import LlamaCppState, Status

IDLE = Status(state=LlamaCppState.OK, slots_idle=2)
BUSY = Status(state=LlamaCppState.OK, slots_idle=1, slots_processing=1)


def test_status_board_counts_only_changes_as_new_versions() -> None:
    """Publishing an equal status again neither bumps the version nor reports a change."""
    board = StatusBoard()
    assert board.publish(IDLE) is True
    assert board.publish(Status(state=LlamaCppState.OK, slots_idle=2)) is False
    assert board.publish(BUSY) is True
    assert board.current() == (2, BUSY)


def test_status_board_has_no_current_status_before_the_first_publish() -> None:
    """current() refuses to invent a status nobody observed."""
    with pytest.raises(LookupError):
        StatusBoard().current()


async def test_status_board_wakes_a_reader_waiting_for_a_newer_status() -> None:
    """A reader waiting past version 1 wakes with version 2 once it is published."""
    board = StatusBoard()
    board.publish(IDLE)
    waiter = asyncio.create_task(board.newer_than(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    board.publish(BUSY)
    assert await waiter == (2, BUSY)


async def test_status_board_answers_at_once_when_the_reader_is_behind() -> None:
    """A reader that missed versions gets the latest without waiting."""
    board = StatusBoard()
    board.publish(IDLE)
    board.publish(BUSY)
    assert await board.newer_than(0) == (2, BUSY)
