"""The id that follows a request through logs, traces and the response.

A client's own ``X-Request-Id`` is kept when it is reasonable (short, printable, no spaces), so
that ids can be correlated across systems; otherwise the balancer makes one: 64 random bits in
hex. They come from a generator seeded once from the kernel, not from ``secrets``, which asks the
kernel for every id (a getrandom system call): an id names a request, it guards nothing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Protocol

_ACCEPTABLE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ids = random.Random()  # seeded from os.urandom, once


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


def request_id(request: _HasHeaders) -> str:
    offered = request.headers.get("X-Request-Id")
    if offered is not None and _ACCEPTABLE.match(offered):
        return offered
    return f"{_ids.getrandbits(64):016x}"
