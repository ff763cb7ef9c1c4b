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
- *A worker process* (``ProcessPoolExecutor``, one worker): the loop's share is handing the body
  over (pickled by the executor's feeder thread, about 0.6 ms per MB) and receiving the traits,
  which are small because the prompt is cut to ``PROMPT_CHARS``. A 16 MB body of small objects:
  the longest pause of a 1 ms ticker on the loop was 18 ms for one body and 5 ms with four in
  the queue, where inline parsing paused it 450 ms per body. A round trip costs about 1.5 ms.
- Inline, under ``INLINE_BYTES``: at the worst rate above, 64 KiB parse in under 3 ms, cheaper
  than the round trip to the worker, and nearly every request is that small.

Chosen: inline under ``INLINE_BYTES``, the worker above. Through a real balancer
(``./scripts/bench large-bodies``, load 3 on 2 cores), a concurrent stream's longest stall was
35 ms with one 30 MB body (1.3-1.5 s before) and 150-180 ms with four at once (4-5 s before).
What remains is whole-body copies: the pickle in the executor's feeder thread, which holds the
GIL for 15-20 ms per 30 MB, and the join of the body's chunks. Writing the body to a worker's
pipe in pieces (a plain subprocess instead of ``ProcessPoolExecutor``) would remove the first. The worker is started (forkserver,
or spawn where there is none: never fork, the balancer has threads) when the reader is entered,
and stopped when it is left. If it dies (killed, out of memory), the requests it had get no
traits, exactly as a body that is not JSON, and go on to llama.cpp unchanged; a new worker is
started for the next one. Its queue needs no bound of its own: every body waiting in it belongs
to a request that holds it against ``--request-body-memory`` (a cancelled request's body leaves
the queue, unless the worker already took it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from paddler.balancer.request_traits import NO_TRAITS, RequestTraits, inspect

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Bodies up to this size are read on the event loop (under 3 ms at the worst rate measured)."""


class TraitsReader:
    """Reads request traits inline or in a worker process; use as an async context manager."""

    def __init__(self, inline_bytes: int = INLINE_BYTES) -> None:
        self._inline_bytes = inline_bytes
        self._worker: ProcessPoolExecutor | None = None

    async def __aenter__(self) -> TraitsReader:
        self._worker = _new_worker()
        # Starting the first process also starts the forkserver, and waits for it: not on the loop.
        await asyncio.to_thread(_wait_until_started, self._worker)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.shutdown, wait=True, cancel_futures=True)

    async def read(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> RequestTraits:
        """What ``request_traits.inspect`` says of the request, never holding the loop long."""
        if len(body) <= self._inline_bytes or method != "POST":
            return inspect(method, path, query, body)
        worker = self._worker
        assert worker is not None, "use as an async context manager"
        model = query.get("model")
        try:
            return await asyncio.wrap_future(
                worker.submit(inspect, method, path, {"model": model} if model else {}, body)
            )
        except BrokenProcessPool:
            if self._worker is worker:
                log.warning("the request-traits worker died; starting a new one")
                worker.shutdown(wait=False, cancel_futures=True)
                # Its process starts with the next body: a fork of the running forkserver.
                self._worker = _new_worker()
            return NO_TRAITS
        except MemoryError:
            return NO_TRAITS


def _new_worker() -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=1, mp_context=context)


def _wait_until_started(worker: ProcessPoolExecutor) -> None:
    worker.submit(inspect, "GET", "/", {}, b"").result()
