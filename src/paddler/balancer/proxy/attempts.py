"""What one request met on each server it was sent to, and what the client gets if all failed.

The proxy records every failed attempt here, with the cause in words ("cannot connect:
Connection refused", "answered 503: Loading model") and, when the server answered, its answer
itself (``HeldAnswer``). When no attempt is left, the client gets, in this order:

1. the last answer a server gave that was not evidence against it (a 500 or a 501, say),
   unchanged: it is llama.cpp's own account of what is wrong with the request;
2. otherwise a 502 that names each server tried and what went wrong there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paddler.balancer.api_error import ApiError
from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.proxy.upstream import HeldAnswer
from paddler.balancer.proxy.verdict import Fault

_MAX_CAUSES = 8
_MAX_CAUSE_CHARS = 300


@dataclass(frozen=True)
class Failure:
    agent: AgentController
    fault: Fault
    cause: str
    answer: HeldAnswer | None = None


@dataclass(slots=True)
class Attempts:
    failures: list[Failure] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    """The ids of the servers it was sent to, in order (each once: a server tried is excluded
    from the next pick). A list: an empty set takes 216 bytes, held by every waiting request."""

    def sent_to(self, agent: AgentController) -> None:
        if agent.id not in self.tried:
            self.tried.append(agent.id)

    def failed(self, failure: Failure) -> None:
        self.failures.append(failure)

    @property
    def failed_elsewhere(self) -> bool:
        """Whether a server already answered this request with an unexplained 5xx."""
        return any(failure.fault is Fault.UNSURE for failure in self.failures)

    def suspects(self) -> list[Failure]:
        """The unexplained 5xx answers, which count against their servers once another
        server serves the same request."""
        return [failure for failure in self.failures if failure.fault is Fault.UNSURE]

    def best_answer(self) -> Failure | None:
        """The last failure whose answer was kept: a server's own account of the request."""
        for failure in reversed(self.failures):
            if failure.answer is not None:
                return failure
        return None

    def summary(self) -> ApiError:
        """Every server tried and what went wrong there, as one 502."""
        causes = [f"{failure.agent.name}: {_clip(failure.cause)}" for failure in self.failures][
            :_MAX_CAUSES
        ]
        if len(self.failures) > _MAX_CAUSES:
            causes.append(f"and {len(self.failures) - _MAX_CAUSES} more")
        detail = "; ".join(causes) if causes else "no server was tried"
        return ApiError(
            502, f"no llama.cpp server could answer this request ({detail})", "server_error"
        )


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CAUSE_CHARS else text[: _MAX_CAUSE_CHARS - 1] + "…"
