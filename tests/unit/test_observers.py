"""``Observers``: every hook reaches each observer that overrides it, and a failing one is only
logged."""

from __future__ import annotations

import logging

import pytest

from paddler.balancer.observability.observers import Observer, Observers, RequestRecord


def _record() -> RequestRecord:
    return RequestRecord(
        id="r1", method="POST", path="/completion", route="/completion", needs_slot=True
    )


class _Counting(Observer):
    def __init__(self) -> None:
        self.heard: list[str] = []

    def request_started(self, record: RequestRecord) -> None:
        self.heard.append(f"started {record.id}")

    def request_finished(self, record: RequestRecord) -> None:
        self.heard.append(f"finished {record.id}")


class _Failing(Observer):
    def request_finished(self, record: RequestRecord) -> None:
        raise RuntimeError("an observer bug")


def test_each_hook_reaches_every_observer_that_overrides_it_in_order() -> None:
    """Two observers hear the hooks they override, in the order they were added; hooks that
    nobody overrides do nothing."""
    first, second = _Counting(), _Counting()
    observers = Observers([first])
    observers.add(second)
    record = _record()
    observers.request_started(record)
    observers.buffer_wait_started(record)
    observers.first_chunk(record)
    observers.request_finished(record)
    assert first.heard == second.heard == ["started r1", "finished r1"]


def test_an_observer_that_raises_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in one observer never fails the request, nor silences the observers after it."""
    after = _Counting()
    observers = Observers([_Failing(), after])
    with caplog.at_level(logging.ERROR, logger="paddler.balancer.observability.observers"):
        observers.request_finished(_record())
    assert after.heard == ["finished r1"]
    (failure,) = caplog.records
    assert failure.getMessage().startswith("observer ")
    assert failure.exc_info is not None
