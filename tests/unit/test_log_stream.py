"""Log lines on standard error: flushed once per loop iteration on the loop, at once off it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from paddler.cli.log_stream import IterationFlushedHandler

pytestmark = pytest.mark.both_event_loops


@pytest.fixture
def pipe() -> Iterator[tuple[int, IterationFlushedHandler, logging.Logger]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    name = f"test_log_stream.{write_end}"
    handler = IterationFlushedHandler(write_end, batched=[name])
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield read_end, handler, logger
    finally:
        logger.removeHandler(handler)
        handler.flush_now()
        os.close(read_end)
        os.close(write_end)


def written(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_off_the_loop_each_line_goes_out_at_once(
    pipe: tuple[int, IterationFlushedHandler, logging.Logger],
) -> None:
    read_end, _, logger = pipe
    logger.info("one")
    assert written(read_end) == b"one\n"


async def test_on_the_loop_an_iterations_lines_go_out_together_at_its_end(
    pipe: tuple[int, IterationFlushedHandler, logging.Logger],
) -> None:
    read_end, handler, logger = pipe
    handler.bind(asyncio.get_running_loop())
    for line in ("one", "two", "three"):
        logger.info(line)
    assert written(read_end) == b""  # still this iteration
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert written(read_end) == b"one\ntwo\nthree\n"
    logger.info("four")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert written(read_end) == b"four\n"


async def test_another_thread_and_a_stopped_loop_flush_at_once(
    pipe: tuple[int, IterationFlushedHandler, logging.Logger],
) -> None:
    read_end, handler, logger = pipe
    handler.bind(asyncio.get_running_loop())
    other = threading.Thread(target=logger.info, args=("from a thread",))
    other.start()
    other.join()
    assert written(read_end) == b"from a thread\n"
    stopped = asyncio.new_event_loop()
    try:
        handler.bind(stopped)
        logger.info("after the loop")
        assert written(read_end) == b"after the loop\n"
    finally:
        stopped.close()


def test_a_plain_write_is_what_handling_the_record_writes(
    pipe: tuple[int, IterationFlushedHandler, logging.Logger],
) -> None:
    """With the text formatter, a line written from its fields alone is the one its record
    gives; with a filter or another formatter, nothing is written and handle() must be used."""
    from paddler.cli.process import LAYOUT, OneLineFormatter

    read_end, handler, logger = pipe
    handler.setFormatter(OneLineFormatter(LAYOUT))
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, "request r1 -> 200", (), None)
    handler.handle(record)
    by_record = written(read_end)
    assert handler.write_plain(
        record.created, logging.INFO, "INFO", logger.name, "request r1 -> 200"
    )
    assert written(read_end) == by_record
    handler.setLevel(logging.INFO)
    assert not handler.write_plain(record.created, logging.DEBUG, "DEBUG", logger.name, "m")
    handler.addFilter(lambda _record: True)
    assert not handler.write_plain(record.created, logging.INFO, "INFO", logger.name, "m")
    handler.filters.clear()
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert not handler.write_plain(record.created, logging.INFO, "INFO", logger.name, "m")
    assert written(read_end) == b""


async def test_other_loggers_lines_go_out_at_once_with_those_before_them(
    pipe: tuple[int, IterationFlushedHandler, logging.Logger],
) -> None:
    """A line of a logger that is not batched (what a process says of its life) is written
    at once, and the batched lines before it with it, in order."""
    read_end, handler, logger = pipe
    handler.bind(asyncio.get_running_loop())
    logger.info("request one")
    other = logging.getLogger("test_log_stream.lifecycle")
    other.propagate = False
    other.addHandler(handler)
    try:
        other.warning("listening")
    finally:
        other.removeHandler(handler)
    assert written(read_end) == b"request one\nlistening\n"
