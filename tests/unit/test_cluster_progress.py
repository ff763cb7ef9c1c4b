"""What ``paddler cluster`` prints while it starts and stops, and how it reads a child's log."""

from __future__ import annotations

import io

import pytest

from paddler.cluster.child import describe_exit, log_message
from paddler.cluster.progress import Interrupted, Progress
from tests.support.balancer import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(
    interactive: bool, **options: float
) -> tuple[Progress, io.StringIO, io.BytesIO, Clock]:
    out, err, clock = io.StringIO(), io.BytesIO(), Clock()
    return (
        Progress(out, err, interactive=interactive, clear_for_logs=True, clock=clock, **options),
        out,
        err,
        clock,
    )


async def test_off_a_terminal_each_step_prints_whole_lines_and_never_rewrites_one() -> None:
    """In a pipe: the step's line when it starts, one per change of its detail, no rewrites."""
    shown, out, _, clock = progress(interactive=False)
    shown.say("Starting")
    async with shown.step("waiting for the agents") as step:
        step.update("0 of 2 ready")
        step.update("0 of 2 ready")
        step.update("2 of 2 ready")
        step.finish(step.detail)
        clock.now += 0.7
    assert out.getvalue() == (
        "Starting\n"
        "  waiting for the agents ...\n"
        "  waiting for the agents: 0 of 2 ready\n"
        "  waiting for the agents: 2 of 2 ready\n"
    )
    assert "\r" not in out.getvalue()


async def test_off_a_terminal_a_long_step_says_it_is_still_running() -> None:
    """A step that lasts prints "still ..." with its detail and the time so far."""
    shown, out, _, clock = progress(interactive=False, still_every=0.001)
    async with shown.step("starting the balancer"):
        clock.now += 12
        await wait_until(lambda: "still" in out.getvalue(), timeout=5)
    assert "  still starting the balancer (12 s)\n" in out.getvalue()


async def test_on_a_terminal_a_step_ends_on_one_line_with_its_outcome_and_time() -> None:
    """On a terminal the step's line is redrawn in place and ends with outcome and duration."""
    shown, out, _, clock = progress(interactive=True)
    async with shown.step("starting the balancer", " (note)"):
        clock.now += 0.4
    text = out.getvalue()
    assert text.endswith("\r\x1b[K  starting the balancer ... done (0.4 s)\n")
    assert "  starting the balancer (note) ... | 0.0 s" in text


@pytest.mark.parametrize(
    ("error", "outcome"), [(Interrupted(), "interrupted"), (RuntimeError(), "failed")]
)
async def test_a_step_left_by_an_exception_says_how_it_ended(
    error: Exception, outcome: str
) -> None:
    """A step stopped by the user ends as interrupted; any other exception as failed."""
    shown, out, _, _ = progress(interactive=True)
    with pytest.raises(type(error)):
        async with shown.step("writing the tiny model"):
            raise error
    assert out.getvalue().endswith(f"  writing the tiny model ... {outcome} (0.0 s)\n")


async def test_a_childs_log_line_lifts_the_spinner_out_of_its_way() -> None:
    """On a terminal a log line on stderr clears the step's line first and redraws it after."""
    shown, out, err, _ = progress(interactive=True)
    async with shown.step("waiting for the agents"):
        before = len(out.getvalue())
        shown.log_line(b"2026-12-01 10:00:00,000 INFO paddler: hello\n")
        after = out.getvalue()[before:]
    assert err.getvalue() == b"2026-12-01 10:00:00,000 INFO paddler: hello\n"
    assert after.startswith("\r\x1b[K\r\x1b[K  waiting for the agents ...")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "2026-12-01 10:23:06,905 ERROR paddler: cannot listen on 127.0.0.1:8086: "
            "Address already in use\n",
            "cannot listen on 127.0.0.1:8086: Address already in use",
        ),
        ('{"time": "t", "level": "ERROR", "logger": "paddler", "message": "boom"}', "boom"),
        ("Segmentation fault\n", "Segmentation fault"),
        ("", ""),
    ],
)
def test_the_message_of_a_childs_last_log_line_is_read_without_its_prefix(
    line: str, message: str
) -> None:
    """Text and JSON log lines give their message alone; anything else is kept as it is."""
    assert log_message(line) == message


def test_an_exit_is_described_by_its_code_or_its_signal() -> None:
    """Exit codes and signals read as a person would say them."""
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed by SIGKILL"
