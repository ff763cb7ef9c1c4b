"""The text log line (``cli.process.OneLineFormatter``): the standard layout, made cheaply."""

from __future__ import annotations

import logging
import sys

from paddler.cli.process import OneLineFormatter

_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("paddler.requests", logging.INFO, "", 0, "request %s", ("r1",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_the_time_reads_as_loggings_own_across_seconds() -> None:
    """The strftime kept for a second gives way at the next one; milliseconds are exact."""
    ours, standard = OneLineFormatter(_LAYOUT), logging.Formatter(_LAYOUT)
    for created in (1_790_000_000.004, 1_790_000_000.999, 1_790_000_001.0, 1_790_000_061.25):
        record = _record(created)
        assert ours.format(record) == standard.format(record)


def test_a_workers_lines_name_it_before_the_logger() -> None:
    """A ``--workers`` worker's tag goes between the level and the logger's name, on the fast
    path and on the general one (a traceback) alike."""
    tagged = OneLineFormatter(_LAYOUT, tag="worker 2")
    standard = logging.Formatter("%(asctime)s %(levelname)s worker 2 %(name)s: %(message)s")
    record = _record(1_790_000_000.5)
    assert tagged.format(record) == standard.format(record)
    assert " INFO worker 2 paddler.requests: request r1" in tagged.format(record)
    try:
        raise ValueError("boom")
    except ValueError:
        failing = _record(1_790_000_000.5)
        failing.exc_info = sys.exc_info()
    first = tagged.format(failing).splitlines()[0]
    assert first.endswith(" INFO worker 2 paddler.requests: request r1")


def test_a_plain_line_is_the_line_format_makes_of_the_same_record() -> None:
    """``plain_line`` (the request log's path without a record) and ``format`` agree, with
    a worker's tag and without, and escape alike; another layout has no plain line."""
    for formatter in (OneLineFormatter(_LAYOUT), OneLineFormatter(_LAYOUT, tag="worker 1")):
        for created in (1_790_000_000.004, 1_790_000_000.999, 1_790_000_061.25):
            record = logging.LogRecord(
                "paddler.requests", logging.WARNING, "", 0, "GET /a\nb -> 502", (), None
            )
            record.created, record.msecs = created, (created - int(created)) * 1000
            plain = formatter.plain_line(created, "WARNING", "paddler.requests", "GET /a\nb -> 502")
            assert plain == formatter.format(record)
            assert "\n" not in plain
    assert OneLineFormatter("%(message)s").plain_line(1.0, "INFO", "x", "m") is None
