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
_FIELD = re.compile(rb'"(cache_n|prompt_n|prompt_ms)"\s*:\s*(-?[0-9.eE+-]+)')


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

    Chunks are appended in place; once the buffer holds ``_SLACK`` bytes more than
    ``TAIL_BYTES``, its last ``TAIL_BYTES`` are copied to a new buffer of just that size. So
    each chunk costs its own length and a copy of the tail now and then, and a long stream holds
    at most ``TAIL_BYTES + _SLACK`` bytes in a buffer about that size. (Deleting from the
    front, as before, kept the buffer's allocation: a stream that had sent 19 KiB held 19 KiB
    more, measured with ``python -m bench.profile_proxy --what memory-long``.)
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        tail = self._tail
        tail += chunk
        if len(tail) > TAIL_BYTES + _SLACK:
            self._tail = tail[-TAIL_BYTES:]

    def cache_report(self) -> CacheReport | None:
        """The last ``timings`` object in the tail, or None if there is none (or it is cut)."""
        tail = self._tail
        # From the end: the report is at the end of the answer, and a regex search from the
        # start walks the whole tail (16 KiB after a long stream) to find it.
        start = tail.rfind(b'"timings"')
        found = None
        while start >= 0 and (found := _TIMINGS.match(tail, start)) is None:
            start = tail.rfind(b'"timings"', 0, start)
        if found is None:
            return None
        fields = {name.decode(): value for name, value in _FIELD.findall(found.group(1))}
        try:
            cached = int(float(fields["cache_n"]))
            computed = int(float(fields["prompt_n"]))
            seconds = float(fields.get("prompt_ms", b"0")) / 1000
        except (KeyError, ValueError):
            return None
        if cached < 0 or computed < 0:
            return None
        return CacheReport(cached, computed, max(0.0, seconds))
