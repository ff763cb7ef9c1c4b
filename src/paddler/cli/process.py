"""What only the command line does: logging set-up, host look-ups, signals, exit codes.

Nothing below the CLI reads the environment, installs signal handlers or exits the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import click

from paddler.cli.log_stream import IterationFlushedHandler, bind_to_loop
from paddler.safe_text import escape_unprintable

log = logging.getLogger("paddler")

LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text log line: time, level, logger, message."""


class OneLineFormatter(logging.Formatter):
    """Text log lines that nothing logged can break or forge.

    A request path (aiohttp decodes ``%0a``), a request id, a model name or an agent's error
    reaches log messages; a newline in one would start a line that looks like the balancer's
    own, and a terminal escape would rewrite the operator's screen. So each record's line is
    escaped whole, and a traceback is indented under its record, so that only a record starts
    a line.
    """

    _second: int | None = None
    _stamp = ""

    def __init__(self, fmt: str | None = None, tag: str | None = None) -> None:
        """``tag``: what ``LAYOUT``'s lines say of the process before the logger's name."""
        self._fast = fmt == LAYOUT
        self._prefix = "" if tag is None else f"{tag} "
        if self._fast and tag is not None:
            fmt = LAYOUT.replace("%(name)s", f"{tag} %(name)s")
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        """``LAYOUT``'s line, made with one f-string when the record carries no traceback: a
        request logs a line, and ``logging.Formatter.format``'s general case (a ``%`` of the
        record's whole dictionary) took 26 k instructions a line where this takes 14 k
        (callgrind, in process)."""
        if not self._fast or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = self.formatTime(record, self.datefmt)
        return escape_unprintable(
            f"{asctime} {record.levelname} {self._prefix}{record.name}: {message}"
        )

    def plain_line(self, created: float, levelname: str, name: str, message: str) -> str | None:
        """The line ``format`` makes of a record with these fields and no traceback, or None
        if this formatter's layout is not ``LAYOUT`` (``log_stream.write_plain``)."""
        if not self._fast or self.datefmt is not None:
            return None
        asctime = self._time_text(created, (created - int(created)) * 1000)
        return escape_unprintable(f"{asctime} {levelname} {self._prefix}{name}: {message}")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_unprintable(super().formatMessage(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The standard ``2026-01-01 12:00:00,123``, its ``strftime`` done once a second: a
        request logs a line, so at a few thousand requests a second it would be done for each."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time_text(record.created, record.msecs)

    def _time_text(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(created))
        return f"{self._stamp},{int(msecs):03d}"

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_unprintable(line) for line in text.splitlines())


def configure_logging(level: str, log_format: str = "text", tag: str | None = None) -> None:
    """``tag``: what each line says of the process before the logger's name (a worker's)."""
    # No line shows the caller's file, thread or process: so that logging does not look them up
    # for every record (the logging HOWTO's "Optimization"; each request logs a line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = IterationFlushedHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={} if tag is None else {"process": tag},
            )
        )
    else:
        handler.setFormatter(OneLineFormatter(LAYOUT, tag=tag))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def resolve_host(host: str) -> str:
    """Resolve host lookups such as ``aws:metadata:local-ipv4`` (see ``host_resolution``)."""
    from paddler.host_resolution import AWS_METADATA_URL, HostResolutionError, resolve_host

    metadata_url = os.environ.get("PADDLER_AWS_METADATA_URL", AWS_METADATA_URL)
    try:
        return resolve_host(host, metadata_url)
    except HostResolutionError as error:
        raise click.ClickException(str(error)) from None


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft limit on open files to the hard limit, and warn if ``wanted`` won't fit.

    The default soft limit (often 1024) would make the balancer run out of file descriptors
    (EMFILE, and asyncio stops accepting for a second) before ``--max-client-connections``
    bites. Raising the soft limit up to the hard one needs no privilege.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, error)
    # Each client connection is one descriptor; keep room for agents, upstreams and logs.
    if soft != resource.RLIM_INFINITY and soft < wanted + 256:
        log.warning(
            "the open-file limit is %d, not above --max-client-connections %d by 256: the "
            "balancer may run out of file descriptors before the cap is reached "
            "(raise the hard limit: ulimit -Hn, or LimitNOFILE= under systemd)",
            soft,
            wanted,
        )


YOUNG_COLLECTION_EVERY = 1_000
"""Net container allocations between two collections of the youngest generation (Python's
default: 700); see ``settle_garbage_collector``."""
OLD_COLLECTION_AFTER = 100
"""Collections of the middle generation between two of the oldest (Python's default: 10)."""


def settle_garbage_collector() -> None:
    """Once the process has started: keep what it built out of every later collection, and
    keep every collection short.

    A proxied request allocates a few hundred containers (the proxy's, the observers') that
    live until it ends. Before ``gc.freeze()``, a full collection walked every object of the
    process (56,000, most of them modules, classes and functions from startup) and held the
    loop 30-40 ms, about once a second at 3,000 requests a second (0.59 s of garbage
    collection in 10 s, 6% of the CPU); frozen after startup, they are never walked again.

    What is left to bound is a collection's length while the live set grows: 10,000 requests
    waiting in the buffer hold 47 containers each, and every one of them survives its young
    collections. A middle-generation collection walks what the last ten young ones promoted:
    with a young threshold of 10,000 (this module's earlier choice), up to 110,000 objects,
    30-38 ms while the buffer filled, longer than ``/health`` may take. With 1,000 it walks at
    most 11,000, 2 ms at most; and the oldest generation is collected after 100 middle ones
    instead of 10, so that a full collection still comes once per million allocations, as
    before. Measured in a balancer filling its buffer with 10,000 requests (``gc.callbacks``):
    the longest collection 38 ms before, 2.1 ms now, and 70-99 ms of collection in all instead
    of 175-183; a small request's instructions did not move (486.9 k and 485.9 k, ``python -m
    bench.profile_proxy instructions``): while the live set stays level, its allocations and
    frees balance and no threshold is reached. The requests leave no garbage cycles
    (``gc.DEBUG_SAVEALL`` found none); the thresholds only bound how long a cycle made
    elsewhere waits to be freed.
    """
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, OLD_COLLECTION_AFTER)


def run_until_signalled(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    fatal: tuple[type[Exception], ...] = (),
    on_hangup: Callable[[], object] | None = None,
    event_loop: str = "uvloop",
    second_signal_exits: bool = True,
) -> None:
    """Run ``main(shutdown)`` on an ``event_loop`` loop (``cli.event_loop``); SIGINT or SIGTERM
    sets ``shutdown``, a second one exits at once (unless ``second_signal_exits`` is False: a
    worker's parent and systemd may both send one).

    With ``on_hangup``, SIGHUP calls it (to re-read a file) instead of ending the process.

    An exception of a ``fatal`` kind (a port that cannot be opened, say) ends the process with
    its message on one line and exit code 1, not with a traceback.
    """

    async def runner() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        bind_to_loop(loop)

        def on_signal(signum: int) -> None:
            if shutdown.is_set():
                if not second_signal_exits:
                    return
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                # At once, without unwinding: unwinding would cancel the handlers that the
                # drain is waiting for, and aiohttp (3.14) logs a traceback for each of them.
                logging.shutdown()
                os._exit(130)
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if on_hangup is not None:

            def on_sighup() -> None:
                log.info("SIGHUP received")
                on_hangup()

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await main(shutdown)

    from paddler.cli import event_loop as loops

    try:
        loops.run(runner(), event_loop)
    except KeyboardInterrupt:
        sys.exit(130)
    except fatal as error:
        log.error("%s", error)
        sys.exit(1)


def notify(state: str) -> None:
    """Tell a supervisor how we are (``READY=1``, ``STOPPING=1``, ``STATUS=...``).

    The systemd notification protocol: one datagram to the Unix socket named by
    ``NOTIFY_SOCKET`` (``@`` for the abstract namespace); nothing without it. ``paddler
    cluster`` listens on such a socket to know that the balancer it started, and not some other
    process, holds its ports. Hand-written: it is one ``sendto``, and the libraries that wrap it
    need libsystemd or are unmaintained.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def require(module: str, extra: str, purpose: str) -> None:
    """Exit with one clear line if an optional dependency (a pip extra) is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise click.ClickException(
            f"{purpose} needs the {module!r} package, which this installation does not have: "
            f"pip install 'paddler[{extra}]'"
        )
