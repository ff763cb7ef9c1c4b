"""What ``paddler cluster`` tells its user while it starts and stops: one short line per step.

On a terminal, the line of the running step shows a spinner and the time it has taken so far,
and ends with its outcome (``starting the balancer ... done (0.4 s)``). Elsewhere (a pipe, a log
file) nothing is ever rewritten: a step prints its line when it starts, a line whenever its
detail changes (``waiting for the agents: 1 of 2 ready``), and ``still ...`` every 10 seconds,
so that a log shows where a start-up hangs.

These lines go to stdout; the children's log lines go to stderr, through ``log_line``, which on
a terminal lifts the step's line out of their way and puts it back after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO, TextIO

_CLEAR_LINE = "\r\x1b[K"
_SPINNER = "|/-\\"


class Interrupted(Exception):
    """Raised inside a step that the user stopped: it ends as ``interrupted``, not ``failed``."""


def seconds(elapsed: float) -> str:
    return f"{elapsed:.1f} s" if elapsed < 10 else f"{elapsed:.0f} s"


class Step:
    """A step in progress: ``update`` its detail, or ``finish`` it with an outcome."""

    def __init__(self, progress: Progress, text: str, note: str, started: float) -> None:
        self._progress = progress
        self.text = text
        self.note = note
        self.started = started
        self.detail = ""
        self.outcome = "done"

    def update(self, detail: str) -> None:
        if detail != self.detail:
            self.detail = detail
            self._progress._changed(self)

    def finish(self, outcome: str) -> None:
        self.outcome = outcome


class Progress:
    def __init__(
        self,
        out: TextIO,
        err: BinaryIO,
        *,
        interactive: bool,
        clear_for_logs: bool = False,
        clock: Callable[[], float] = time.monotonic,
        redraw_every: float = 0.1,
        still_every: float = 10.0,
    ) -> None:
        self._out = out
        self._err = err
        self._interactive = interactive
        self._clear_for_logs = interactive and clear_for_logs
        self._clock = clock
        self._redraw_every = redraw_every
        self._still_every = still_every
        self._step: Step | None = None
        self._frame = 0

    @classmethod
    def on_terminal(cls) -> Progress:
        """Steps on stdout, spinning when it is a terminal; the children's logs on stderr."""
        return cls(
            sys.stdout,
            sys.stderr.buffer,
            interactive=sys.stdout.isatty(),
            clear_for_logs=sys.stderr.isatty(),
        )

    def say(self, text: str) -> None:
        """Print a line of its own."""
        self._lift()
        self._out.write(text + "\n")
        self._out.flush()
        self._draw()

    @contextlib.asynccontextmanager
    async def step(self, text: str, note: str = "") -> AsyncIterator[Step]:
        """A step that lasts: shown while it runs, with its outcome (or ``failed``) at the end.

        ``note`` follows ``text`` while the step runs, and is left out of the later lines.
        """
        step = Step(self, text, note, self._clock())
        self._step = step
        if self._interactive:
            self._draw()
        else:
            self._print(f"  {text}{note} ...")
        ticker = asyncio.create_task(self._tick(step))
        try:
            yield step
        except Interrupted:
            step.finish("interrupted")
            raise
        except BaseException:
            step.finish("failed")
            raise
        finally:
            ticker.cancel()
            await asyncio.wait([ticker])
            self._end(step)

    def log_line(self, line: bytes) -> None:
        """Write a child's log line to stderr without tearing the step's line on a terminal."""
        if self._clear_for_logs and self._step is not None:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
        self._err.write(line)
        self._err.flush()
        if self._clear_for_logs:
            self._draw()

    def _changed(self, step: Step) -> None:
        if self._interactive:
            self._draw()
        else:
            self._print(f"  {step.text}: {step.detail}")

    def _end(self, step: Step) -> None:
        self._step = None
        took = seconds(self._clock() - step.started)
        if self._interactive:
            self._out.write(f"{_CLEAR_LINE}  {step.text} ... {step.outcome} ({took})\n")
            self._out.flush()
        elif step.outcome not in ("done", step.detail):
            self._print(f"  {step.text}: {step.outcome} ({took})")

    async def _tick(self, step: Step) -> None:
        every = self._redraw_every if self._interactive else self._still_every
        while True:
            await asyncio.sleep(every)
            if self._interactive:
                self._frame += 1
                self._draw()
            else:
                detail = f": {step.detail}" if step.detail else ""
                took = seconds(self._clock() - step.started)
                self._print(f"  still {step.text}{detail} ({took})")

    def _draw(self) -> None:
        step = self._step
        if step is None or not self._interactive:
            return
        detail = f"{step.detail} " if step.detail else ""
        spinner = _SPINNER[self._frame % len(_SPINNER)]
        took = seconds(self._clock() - step.started)
        self._out.write(f"{_CLEAR_LINE}  {step.text}{step.note} ... {detail}{spinner} {took}")
        self._out.flush()

    def _lift(self) -> None:
        if self._interactive and self._step is not None:
            self._out.write(_CLEAR_LINE)

    def _print(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()
