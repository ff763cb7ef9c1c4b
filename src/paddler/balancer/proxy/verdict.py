"""Whose fault was an upstream answer: the one place that decides (see docs/failures.md).

A balancer that blames servers for their clients' mistakes can be emptied by any client: send a
request every server refuses, and every circuit opens. So only evidence against a *server*
takes it out of rotation:

- it cannot be connected to, or it breaks the connection before answering (``SERVER``);
- it answers 502, 503 or 504 before any byte (``SERVER``): its own front door says it is not
  serving;
- it breaks mid-response (decided by the proxy as it relays; ``SERVER`` too);
- it fails a request that another server then serves (``UNSURE`` at first, see below).

Everything else is the request's own answer, and passes through to the client unchanged:

- every 4xx (bad JSON, a context overflow, a missing API key, an unknown route, ...);
- 501: llama.cpp does not offer that route with its current options (embeddings without
  ``--embeddings``, infill on a model without infill tokens). Another server may have been
  started differently, so the request goes to one that is not known to lack the route, if there
  is one; the server is remembered as lacking it (``route_support``);
- any other 5xx that *another* server also answered with a 5xx: the request, not the servers,
  is what fails.

A 5xx from the first server (500, say) cannot be judged alone: it is ``UNSURE``. The request is
tried on another server; if that one serves it, the first 5xx counts against the first server
(repeated ones open its circuit); if that one fails it too, neither counts and the client gets
the second server's answer. With no other server to ask, the answer passes through and counts
against nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SERVER_FAULT_STATUSES = frozenset({502, 503, 504})
NOT_IMPLEMENTED = 501


class Fault(StrEnum):
    NONE = "none"
    """A good answer (below 400)."""
    REQUEST = "request"
    """The request's own fault: it would fail wherever it went."""
    SERVER = "server"
    """Evidence against the server."""
    UNSURE = "unsure"
    """A 5xx that only another server's answer to the same request can judge."""


class Action(StrEnum):
    RELAY = "relay"
    """Send this answer to the client."""
    RETRY = "retry"
    """Try another server; keep this answer in case no other can do better."""


@dataclass(frozen=True)
class Verdict:
    fault: Fault
    action: Action


def judge(status: int, *, failed_elsewhere: bool, can_retry: bool) -> Verdict:
    """What to make of a status line received before any byte was relayed.

    ``failed_elsewhere``: another server already answered this request with a 5xx of the
    ``UNSURE`` kind. ``can_retry``: an attempt is left, and another server could take it (for a
    501, one not known to lack the route).
    """
    if status < 400:
        return Verdict(Fault.NONE, Action.RELAY)
    if status < 500:
        return Verdict(Fault.REQUEST, Action.RELAY)
    if status == NOT_IMPLEMENTED:
        return Verdict(Fault.REQUEST, Action.RETRY if can_retry else Action.RELAY)
    if status in SERVER_FAULT_STATUSES:
        return Verdict(Fault.SERVER, Action.RETRY)
    if failed_elsewhere:
        return Verdict(Fault.REQUEST, Action.RELAY)
    return Verdict(Fault.UNSURE, Action.RETRY if can_retry else Action.RELAY)
