"""``paddler.cli.event_loop``: the loop each command runs on, and the line that names it."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from paddler.cli.event_loop import describe, run


async def _running_loop() -> str:
    return describe(asyncio.get_running_loop())


def test_the_default_runs_on_uvloop_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """``uvloop``: the coroutine runs on uvloop, and one INFO line names it with its version."""
    with caplog.at_level(logging.INFO, logger="paddler"):
        running = run(_running_loop(), "uvloop")
    assert running.startswith("uvloop 0.")
    assert [record.getMessage() for record in caplog.records] == [f"event loop: {running}"]


def test_asyncio_runs_on_the_standard_librarys_loop(caplog: pytest.LogCaptureFixture) -> None:
    """``asyncio``: the standard library's loop, named in the line."""
    with caplog.at_level(logging.INFO, logger="paddler"):
        assert run(_running_loop(), "asyncio") == "asyncio"
    assert [record.getMessage() for record in caplog.records] == ["event loop: asyncio"]


def test_without_uvloop_asyncio_runs_and_the_line_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where uvloop cannot be imported (Windows), asyncio's loop runs, in one line with the
    reason."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes ``import uvloop`` fail
    with caplog.at_level(logging.INFO, logger="paddler"):
        assert run(_running_loop(), "uvloop") == "asyncio"
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("event loop: asyncio: uvloop cannot be imported (")


def test_the_line_goes_at_the_level_asked(caplog: pytest.LogCaptureFixture) -> None:
    """``paddler cluster`` logs it at DEBUG: its terminal shows progress lines instead."""
    with caplog.at_level(logging.INFO, logger="paddler"):
        run(_running_loop(), "uvloop", level=logging.DEBUG)
    assert caplog.records == []
