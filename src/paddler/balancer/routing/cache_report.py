"""What llama.cpp says it found in its prompt cache, read from the end of a response.

Every completion llama.cpp sends ends with a ``timings`` object (the last event of a stream, the
end of a JSON body): ``cache_n`` prompt tokens came from the cache, ``prompt_n`` were computed,
in ``prompt_ms``. Routing learns from these numbers, so the proxy keeps the last few kilobytes of
each generation's response as it relays it (never the whole body) and reads them at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_BYTES = 8192
"""The timings object and what follows it (a usage object, ``data: [DONE]``) fit easily."""
_SLACK = 2048
"""What the tail may grow past ``TAIL_BYTES`` before it is cut back (see ``ResponseTail``)."""

_TIMINGS = re.compile(rb'"timings"\s*:\s*\{([^{}]*)\}')
_NUMBER = rb"\s*:\s*(-?[0-9.eE+-]+)"
_CACHED = re.compile(rb'"cache_n"' + _NUMBER)
_COMPUTED = re.compile(rb'"prompt_n"' + _NUMBER)
_PROMPT_MS = re.compile(rb'"prompt_ms"' + _NUMBER)
_LLAMACPP_TIMINGS = re.compile(
    rb'"timings"\s*:\s*\{\s*"cache_n"' + _NUMBER + rb'\s*,\s*"prompt_n"' + _NUMBER
    + rb'\s*,\s*"prompt_ms"' + _NUMBER + rb"[^{}]*\}"
)  # fmt: skip
"""The object as llama.cpp writes it, its three fields first and in this order: one match
finds all three (each match or search costs about as much as the others together)."""


@dataclass(frozen=True)
class CacheReport:
    cached_tokens: int
    """``cache_n``: prompt tokens llama.cpp reused from its cache."""
    computed_tokens: int
    """``prompt_n``: prompt tokens it had to compute."""
    prompt_seconds: float

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + self.computed_tokens


class ResponseTail:
    """At least the last ``TAIL_BYTES`` of a response, fed chunk by chunk.

    The first chunk is kept as it is (a whole JSON body is one chunk: nothing is copied), or
    its last ``TAIL_BYTES`` if it is longer than ``TAIL_BYTES + _SLACK``. Later chunks are
    appended in place; once the buffer holds ``_SLACK`` bytes more than ``TAIL_BYTES``, its last
    ``TAIL_BYTES`` are copied to a new buffer of just that size. So each chunk costs its own
    length and a copy of the tail now and then, and a long stream holds at most
    ``TAIL_BYTES + _SLACK`` bytes in a buffer about that size. (Deleting from the front, as
    before, kept the buffer's allocation: a stream that had sent 19 KiB held 19 KiB more,
    measured with ``python -m bench.profile_proxy --what memory-long``.)
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail: bytes | bytearray = b""

    def feed(self, chunk: bytes) -> None:
        tail = self._tail
        if not tail and type(chunk) is bytes:  # immutable: it can be kept without a copy
            self._tail = chunk if len(chunk) <= TAIL_BYTES + _SLACK else chunk[-TAIL_BYTES:]
            return
        if type(tail) is not bytearray:
            tail = bytearray(tail)
        tail += chunk
        self._tail = tail if len(tail) <= TAIL_BYTES + _SLACK else tail[-TAIL_BYTES:]

    def cache_report(self) -> CacheReport | None:
        """The last ``timings`` object in the tail, or None if there is none (or it is cut)."""
        tail = self._tail
        # From the end: the report is at the end of the answer, and a regex search from the
        # start walks the whole tail (16 KiB after a long stream) to find it.
        start = tail.rfind(b'"timings"')
        if start >= 0 and (usual := _LLAMACPP_TIMINGS.match(tail, start)) is not None:
            return _report(*usual.groups())
        found = None
        while start >= 0 and (found := _TIMINGS.match(tail, start)) is None:
            start = tail.rfind(b'"timings"', 0, start)
        if found is None:
            return None
        timings = found.group(1)
        cached_n = _CACHED.search(timings)
        computed_n = _COMPUTED.search(timings)
        if cached_n is None or computed_n is None:
            return None
        prompt_ms = _PROMPT_MS.search(timings)
        return _report(
            cached_n.group(1),
            computed_n.group(1),
            prompt_ms.group(1) if prompt_ms is not None else b"0",
        )


def _report(cache_n: bytes, prompt_n: bytes, prompt_ms: bytes) -> CacheReport | None:
    try:
        cached = int(float(cache_n))
        computed = int(float(prompt_n))
        seconds = float(prompt_ms) / 1000
    except ValueError:
        return None
    if cached < 0 or computed < 0:
        return None
    return CacheReport(cached, computed, max(0.0, seconds))
