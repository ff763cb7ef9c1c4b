"""Runs llama.cpp's HTTP server (through the ``xllamacpp`` wheel) in a process of its own.

Usage::

    python -m paddler.agent.llamacpp_child --model PATH --host H --port P --slots N --ctx N
        [--threads N] [--alias A] [--api-key K] [--cache-ram-mib N] [--no-slots]
        [--parent-pid PID] [-- LLAMA_SERVER_OPTION ...]

After ``--`` come llama-server's own options, spelled as for ``llama-server``
(``-- --embeddings --pooling mean -ngl 99``); ``paddler.agent.llamacpp_options`` lists the ones
the embedded server takes. They are applied after the fields above, which they may not set.

Contract with the parent:

- Once llama.cpp listens, exactly one line ``PADDLER_LLAMACPP_READY <url>`` is written to stdout.
  ``--port 0`` lets the server pick a free port; the URL tells which.
- The process exits when its stdin reaches end of file (the parent closed it, or died), on SIGTERM
  or SIGINT, and on Linux when the parent dies (``PR_SET_PDEATHSIG``; ``--parent-pid`` closes the
  gap before that is set up), so it is never orphaned.
  The parent must therefore keep stdin open while it wants the server.
- A server that fails to start exits with status 1 and a reason on stderr; llama.cpp's own log
  goes to stderr too. A llama.cpp option it cannot take makes it exit with status 2 and a
  one-line reason on stderr, before anything is loaded.
- The API key may come from ``PADDLER_LLAMACPP_API_KEY`` instead of ``--api-key``: unlike the
  command line, a process's environment is not readable by other users.

The C++ server has no clean way to stop mid-request, so the process ends with ``os._exit``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from paddler.agent import llamacpp_options
from paddler.agent.llamacpp_options import LlamaCppOptionError

READY_PREFIX = "PADDLER_LLAMACPP_READY"
API_KEY_ENV = "PADDLER_LLAMACPP_API_KEY"
_PR_SET_PDEATHSIG = 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The child's own options, and in ``llamacpp`` the llama-server options after ``--``.

    Exits with status 2 and a one-line reason on a llama.cpp option the server cannot take.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    separator = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:separator], argv[separator + 1 :]
    parser = argparse.ArgumentParser(prog="python -m paddler.agent.llamacpp_child")
    parser.add_argument("--model", required=True, help="path of the GGUF model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--slots", type=int, default=4, help="parallel sequences (n_parallel)")
    parser.add_argument("--ctx", type=int, default=0, help="total context, shared by the slots")
    parser.add_argument("--threads", type=int, default=0, help="0 lets llama.cpp choose")
    parser.add_argument("--alias", default=None, help="model name clients may use")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None)
    parser.add_argument("--cache-ram-mib", type=int, default=None)
    parser.add_argument("--no-slots", action="store_true", help="disable GET /slots")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit at once if this is not our parent"
    )
    args = parser.parse_args(own)
    try:
        args.llamacpp = llamacpp_options.parse(extra)
    except LlamaCppOptionError as error:
        parser.exit(2, f"{error}\n")
    return args


def start_server(args: argparse.Namespace) -> tuple[object, str]:
    """Start llama.cpp in this process; return the server (keep it alive) and its URL."""
    import xllamacpp  # imported here so that --help works without loading the native library

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_ctx = args.ctx
    params.n_parallel = args.slots
    params.port = args.port
    params.hostnames = [args.host]
    params.endpoint_slots = not args.no_slots
    params.endpoint_metrics = True
    if args.threads > 0:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    if args.cache_ram_mib is not None:
        params.cache_ram_mib = args.cache_ram_mib
    if args.alias:
        params.model_alias = {args.alias}
    if args.api_key:
        params.api_keys = [args.api_key]
    llamacpp_options.apply(args.llamacpp, params)
    server = xllamacpp.Server(params)
    return server, str(server.listening_address)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _exit_with_parent(args.parent_pid)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    try:
        # The server must stay referenced until the process exits: dropping it stops llama.cpp.
        _server, url = start_server(args)
    except LlamaCppOptionError as error:  # a value it could not use, such as a missing file
        print(error, file=sys.stderr)
        sys.exit(2)
    except RuntimeError as error:  # xllamacpp's only report: "Failed to init server, ..."
        print(f"llama.cpp did not start: {error} (see its log above)", file=sys.stderr)
        # A normal exit, unlike os._exit, runs llama.cpp's static destructors, which flush the
        # log lines its logging thread still holds: the ones that say why it failed.
        sys.exit(1)
    print(f"{READY_PREFIX} {url}", flush=True)
    # Blocks until EOF; a signal interrupts the read and its handler exits.
    while os.read(sys.stdin.fileno(), 65536):
        pass
    _exit(0)


def _exit_with_parent(parent_pid: int | None) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent may have died before prctl; then nobody would send the signal. (Comparing with
    # 1 instead would fail in a container, where the parent may well be PID 1.)
    if parent_pid is not None and os.getppid() != parent_pid:
        _exit(0)


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    _exit(0)


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        # The parent may have closed the pipe already; then there is nobody left to tell.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
