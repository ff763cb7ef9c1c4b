"""Reading a request's traits without holding the event loop, whatever the body's size or shape.

Routing needs a request's model and the start of its prompt (``request_traits``), and both can
sit anywhere in a JSON body: ``"model"`` after 30 MB of messages is valid JSON. Parsing is the
cost, measured on this project's 2-core test machine with Python 3.11 (``json.loads``, whole body):

===================================================  ==========
body                                                 ms per MB
===================================================  ==========
long strings (four 8 MB messages)                    0.9
chat messages (``{"role":"user","content":"hi"}``)   6 - 14
dense small objects (``{"a":1}``, ``{}``, ``0``)     18 - 29
empty arrays (``[],[],...``), the worst found        43 - 46
===================================================  ==========

So a 30 MB body of small objects holds the loop for 0.5 - 1.3 s, and a thread does not help:
the parser holds the GIL. The choices, measured:

- *Bounded incremental scan* (read the body piece by piece, yield between pieces): finding a
  top-level ``"model"`` means walking every byte outside and inside strings; in Python that is an
  event per token (10 M for such a body, seconds of CPU), and ``raw_decode`` per element is
  unbounded again for one huge element. Rejected.
- *A worker process*: the loop's share is handing the body over and receiving the traits, which
  are small because the prompt is cut to ``PROMPT_CHARS``. First measured with
  ``ProcessPoolExecutor``: a 30 MB body's longest stall of a concurrent stream went from 1.3 s
  to 35 ms, but the executor pickles the whole body in its feeder thread, which holds the GIL
  for 15-20 ms per 30 MB, and its workers outlive a balancer killed with SIGKILL (they wait on a
  queue whose write end they hold themselves; the forkserver and resource tracker stay too).
  So the worker is a plain child process (``traits_worker``), fed through a pipe in
  ``PIECE_BYTES`` slices: the loop never copies more than a slice at once, and the worker ends
  when the pipe does, however the balancer ends.
- The worker is started by the first body that needs it, and then kept.
- Inline, under ``INLINE_BYTES``: at the worst rate above, 64 KiB parse in under 3 ms, cheaper
  than the round trip to the worker (about 1 ms), and nearly every request is that small.

Chosen: inline under ``INLINE_BYTES``, the worker above. Through a real balancer
(``./scripts/bench large-bodies --rounds 5``, load 1.5 on 2 cores), a concurrent stream's longest
stall, median of 5 rounds: 16 ms with one 30 MB body (35 ms with ``ProcessPoolExecutor``, 1.3 s
inline) and 74-79 ms with four at once (150-180 ms, 4-5 s). What is left is the balancer's share
of moving 4 x 30 MB through its sockets (about 130 ms of CPU per body, in slices) while the
worker's parse takes the other core. The worker reads one body at a time, in order. A request
cancelled while its body waits for the worker is dropped from the queue; one cancelled while its
body is being written lets the write finish (the frames must stay whole) and its answer is
discarded. If the worker dies (killed, out of memory), a new one is started and reads the body
again; a body that two workers die on gets no traits, exactly as a body that is not JSON, and
goes on to llama.cpp unchanged. The queue needs no bound of its own: every body waiting in it belongs to a
request that holds it against ``--request-body-memory``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from paddler.balancer.routing.request_traits import NO_TRAITS, RequestTraits, inspect
from paddler.balancer.routing.traits_worker import ANSWER_HEAD, REQUEST_HEAD

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Bodies up to this size are read on the event loop (under 3 ms at the worst rate measured)."""
PIECE_BYTES = 256 * 1024
"""The most of a body written to the worker's pipe at once."""
ANSWER_LIMIT = 16 * 1024 * 1024
"""Largest answer accepted from the worker (a capped prompt, JSON-escaped, is far smaller)."""
STOP_TIMEOUT = 5.0


@dataclass
class _Job:
    method: str
    path: str
    model: str | None
    body: bytes
    abandoned: bool = False


class TraitsReader:
    """Reads request traits inline or in a worker process; use as an async context manager."""

    def __init__(self, inline_bytes: int = INLINE_BYTES, prompts: bool = True) -> None:
        """``prompts``: whether routing reads prompts (``request_traits.inspect``); the worker
        reads them either way, off the loop."""
        self._inline_bytes = inline_bytes
        self._prompts = prompts
        self._worker: asyncio.subprocess.Process | None = None
        self._turn = asyncio.Lock()
        self._exchanges: set[asyncio.Task[RequestTraits]] = set()
        self._open = False

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id, while one runs."""
        return self._worker.pid if self._worker is not None else None

    async def __aenter__(self) -> TraitsReader:
        """The worker starts with the first body that needs it (in about 50 ms, against the
        upload of more than ``INLINE_BYTES``): a balancer that sees none runs no second
        process and keeps its 16 MiB (each of ``--workers``' processes has its own reader)."""
        self._open = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._open = False
        for exchange in list(self._exchanges):
            exchange.cancel()
        if self._exchanges:
            await asyncio.gather(*self._exchanges, return_exceptions=True)
        worker, self._worker = self._worker, None
        if worker is not None:
            await _stop_worker(worker)

    async def read(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> RequestTraits:
        """What ``request_traits.inspect`` says of the request, never holding the loop long."""
        if len(body) <= self._inline_bytes or method != "POST":
            return inspect(method, path, query, body, self._prompts)
        assert self._open, "use as an async context manager"
        job = _Job(method, path, query.get("model") or None, body)
        exchange = asyncio.create_task(self._exchange(job))
        self._exchanges.add(exchange)
        exchange.add_done_callback(self._exchanges.discard)
        try:
            # Shielded: a frame half written must be finished, whoever stopped waiting for it.
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    async def _exchange(self, job: _Job) -> RequestTraits:
        async with self._turn:
            for _ in range(2):
                if job.abandoned:
                    return NO_TRAITS
                worker = self._worker
                if worker is None or worker.returncode is not None:
                    worker = self._worker = await _start_worker()
                try:
                    return await _ask(worker, job)
                except (ConnectionError, asyncio.IncompleteReadError, ValueError) as error:
                    log.warning(
                        "the request-traits worker failed (%s); starting a new one",
                        error or type(error).__name__,
                    )
                    if self._worker is worker:
                        self._worker = None
                    await _stop_worker(worker)
                    # The next worker reads it: the first may have died before this body (a
                    # kill, between two bodies) as well as on it. A body that two workers die on
                    # gets no traits.
            return NO_TRAITS


async def _ask(worker: asyncio.subprocess.Process, job: _Job) -> RequestTraits:
    assert worker.stdin is not None and worker.stdout is not None
    header = json.dumps({"method": job.method, "path": job.path, "model": job.model}).encode()
    worker.stdin.write(REQUEST_HEAD.pack(len(header), len(job.body)) + header)
    body = memoryview(job.body)
    for start in range(0, len(body), PIECE_BYTES):
        worker.stdin.write(body[start : start + PIECE_BYTES])
        await worker.stdin.drain()
    del body
    (size,) = ANSWER_HEAD.unpack(await worker.stdout.readexactly(ANSWER_HEAD.size))
    if size > ANSWER_LIMIT:
        raise ValueError(f"an answer of {size} bytes")
    answer = json.loads(await worker.stdout.readexactly(size))
    return RequestTraits(**answer)


async def _start_worker() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler.balancer.routing.traits_worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _stop_worker(worker: asyncio.subprocess.Process) -> None:
    """End of its stdin ends the worker; a worker that does not go is killed."""
    if worker.stdin is not None:
        worker.stdin.close()
    try:
        await asyncio.wait_for(worker.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            worker.kill()
        await worker.wait()
