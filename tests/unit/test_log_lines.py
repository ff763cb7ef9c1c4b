"""The text log line (``cli.process.OneLineFormatter``): the standard layout, made cheaply."""

from __future__ import annotations

import logging

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
