"""What every benchmark's command line does around its measurements.

A scratch directory for the child processes' logs, SIGTERM turned into cancellation (so that
every child is stopped on the way out, as with Ctrl-C), and the logs kept when the run fails or
when asked to.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

Benchmark = Callable[[Path, str, str], Awaitable[int]]
"""``benchmark(workdir, started_at, stamp)`` returns the exit status."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(benchmark: Benchmark, *, name: str, results_dir: Path, keep_logs: bool) -> NoReturn:
    """Run ``benchmark`` in a scratch directory and exit with its status."""
    started_at = datetime.now(UTC).replace(microsecond=0).isoformat()
    stamp = started_at.replace(":", "").replace("-", "").replace("+0000", "Z")
    kept = results_dir / f"logs-{name}-{stamp}"
    with tempfile.TemporaryDirectory(prefix=f"paddler-{name}-") as temporary:
        workdir = Path(temporary)
        # nginx's workers run as "nobody" and must reach their directory below this one.
        workdir.chmod(0o755)
        try:
            status = asyncio.run(_cancellable(benchmark(workdir, started_at, stamp)))
        except BaseException:
            shutil.copytree(workdir, kept, dirs_exist_ok=True)
            say(f"the benchmark did not finish; the processes' logs are in {kept}")
            if sys.exc_info()[0] is KeyboardInterrupt:
                sys.exit(130)
            if sys.exc_info()[0] is asyncio.CancelledError:  # SIGTERM
                sys.exit(143)
            raise
        if keep_logs:
            shutil.copytree(workdir, kept, dirs_exist_ok=True)
            say(f"the processes' logs: {kept}")
    sys.exit(status)


async def _cancellable(measurements: Awaitable[int]) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measurements
