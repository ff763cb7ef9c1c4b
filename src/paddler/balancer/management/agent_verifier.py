"""The balancer reaches a registered server itself before it counts any of its slots.

An agent's registration is a claim: "llama.cpp listens at this address, with these slots". Anyone
who can open the agents' socket can make it, for an address nothing listens on, with 60,000 idle
slots. Believed, such a claim inflates ``/health``, the metrics and the autoscaling advice, and
draws requests to an address that was never tried. So each socket verifies its agent
(``AgentSocket`` runs ``verify`` as a task of its own handler, and cancels it when the socket
ends):

1. ``GET <url>/health``, from the balancer: a 200, or llama.cpp's 503 while it loads its model,
   proves that a llama.cpp server answers there. Anything else (no connection, a timeout,
   another status, an answer larger than ``MAX_ANSWER_BYTES``) is retried with a backoff that
   doubles up to ``RETRY_MAX``, and the reason is shown in ``/api/v1/agents``.
2. ``GET <url>/props`` (with ``--llamacpp-api-key`` when llama.cpp has one): its ``total_slots``
   bounds the slots counted there. When it cannot be read (no key, a router-mode server, not
   llama.cpp's answer) ``--max-slots-per-agent`` bounds them instead; while llama.cpp is loading
   the flag bounds them and ``/props`` is asked again until it answers.

The agent then counts as its reports say, within that bound. A re-registration at a new address
is a new agent, verified anew; one at the same address keeps what was verified, and refreshes the
bound.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from paddler.agent.backoff import Backoff
from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.agent_controller_pool import AgentControllerPool
from paddler.balancer.proxy.upstream import Upstream

log = logging.getLogger(__name__)

TIMEOUT = 5.0
"""Seconds for one check, connecting included: llama.cpp answers these from memory."""
MAX_ANSWER_BYTES = 256 * 1024
"""llama.cpp's ``/props`` is a few kilobytes (its chat template included)."""
RETRY_INITIAL = 0.2
RETRY_MAX = 10.0


class Unreachable(Exception):
    """The address did not answer as a llama.cpp server does."""


class AgentVerifier:
    def __init__(
        self,
        pool: AgentControllerPool,
        upstream: Upstream,
        *,
        max_slots: int,
        api_key: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self._pool = pool
        self._upstream = upstream
        self._max_slots = max_slots
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout

    async def verify(self, agent: AgentController, session: int) -> None:
        """Check ``agent``'s address until it is verified and bounded, or ``session`` ends."""
        backoff = Backoff(RETRY_INITIAL, RETRY_MAX)
        reported: str | None = None
        while self._pool.owns(agent, session):
            try:
                await self._get(agent, "/health", expect=(200, 503))
            except Unreachable as error:
                reason = f"the balancer cannot reach it: {error}"
                if reason != reported:
                    log.warning(
                        "agent %s at %s is not counted: %s; retrying", agent.name, agent.url, reason
                    )
                    reported = reason
                self._pool.unverified(agent, reason, session=session)
                await asyncio.sleep(backoff.next_delay())
                continue
            bound, how, final = await self._bound(agent)
            self._pool.verified(agent, bound, how, session=session)
            if final:
                return
            await asyncio.sleep(backoff.next_delay())

    async def _bound(self, agent: AgentController) -> tuple[int, str, bool]:
        """The slot bound, where it comes from, and whether asking again could change it."""
        fallback = f"at most --max-slots-per-agent={self._max_slots}"
        try:
            status, body = await self._get(agent, "/props")
        except Unreachable as error:
            return self._max_slots, f"{fallback}: /props failed ({error})", False
        if status == 503:
            return self._max_slots, f"{fallback} while llama.cpp loads", False
        if status in (401, 403):
            return self._max_slots, f"{fallback}: /props needs --llamacpp-api-key", True
        if status != 200:
            return self._max_slots, f"{fallback}: /props answered {status}", True
        try:
            slots = json.loads(body)["total_slots"]
        except (ValueError, TypeError, KeyError):
            slots = None
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            return self._max_slots, f"{fallback}: /props has no total_slots", True
        return slots, f"/props total_slots={slots}", True

    async def _get(
        self, agent: AgentController, path: str, expect: tuple[int, ...] | None = None
    ) -> tuple[int, bytes]:
        try:
            status, body = await self._upstream.fetch(
                agent.url + path,
                self._headers,
                timeout=self._timeout,
                limit=MAX_ANSWER_BYTES,
            )
        except TimeoutError:
            raise Unreachable(f"GET {path} took more than {self._timeout:g}s") from None
        except ValueError as error:
            raise Unreachable(f"GET {path}: {error}") from None
        except (aiohttp.ClientError, OSError) as error:
            raise Unreachable(f"GET {path} failed: {error or type(error).__name__}") from None
        if expect is not None and status not in expect:
            raise Unreachable(f"GET {path} answered {status}")
        return status, body
