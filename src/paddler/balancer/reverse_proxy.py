"""The client-facing port: every llama.cpp route, passed through to a server that can take it.

A request is read whole first (it is bounded by ``--max-request-body-size``), so that it can be
sent again if the first server fails before answering. Then, up to ``1 + max_retries`` times:
reserve an agent (waiting in the buffer if none is free), send, and relay the answer.

A server that cannot be connected to, or that answers 502/503/504 before anything was relayed,
is taken out of rotation and the request goes to another server. Any other 5xx may be the
request's own fault: it is also retried elsewhere, but only repeated ones open the circuit, so
that a single poisonous request cannot empty the fleet. When no attempt is left, the client gets
the last server's own 5xx answer.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from paddler.balancer import errors
from paddler.balancer.agent_controller import AgentController
from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.body_budget import BodyBudget
from paddler.balancer.request_buffer import BufferRejection, NoCandidates, RequestBuffer
from paddler.balancer.routes import needs_slot
from paddler.balancer.upstream import (
    ConnectFailed,
    Upstream,
    UpstreamBroken,
    discard,
    relay,
)
from paddler.config import BalancerConfig

log = logging.getLogger(__name__)

_TRIPPING_STATUSES = frozenset({502, 503, 504})


class ReverseProxy:
    def __init__(
        self,
        config: BalancerConfig,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        upstream: Upstream,
    ) -> None:
        self._config = config
        self._pool = pool
        self._buffer = buffer
        self._upstream = upstream
        self._budget = BodyBudget(config.request_body_memory)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_request_body_size)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def health(self, request: web.Request) -> web.Response:
        """Aggregate slots of usable agents; 503 while no agent can serve a request."""
        fleet = self._pool.snapshot()
        ok = fleet.usable_agents > 0
        return web.json_response(
            {
                "status": "ok" if ok else "no_usable_agents",
                "slots_idle": fleet.slots_idle,
                "slots_processing": fleet.slots_processing,
                "requests_buffered": self._buffer.waiting,
            },
            status=200 if ok else 503,
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
        except errors.ApiError as error:
            log.info("%s %s refused: %s", request.method, request.path, error.message)
            return error.response()
        try:
            return await self._dispatch(request, body)
        finally:
            self._budget.give(len(body))

    async def _dispatch(self, request: web.Request, body: bytes) -> web.StreamResponse:
        slot = needs_slot(request.method, request.path)
        deadline = asyncio.get_running_loop().time() + self._buffer.timeout
        tried: set[str] = set()
        last_error: errors.ApiError | None = None
        for attempt in range(self._config.max_retries + 1):
            is_last = attempt == self._config.max_retries
            try:
                guard = await self._buffer.acquire(
                    needs_slot=slot, exclude=frozenset(tried), deadline=deadline
                )
            except BufferRejection as rejection:
                if isinstance(rejection, NoCandidates) and last_error is not None:
                    return last_error.response()
                refusal = errors.from_buffer(rejection)
                log.warning("%s %s: %s", request.method, request.path, refusal.message)
                return refusal.response()
            with guard:
                agent = guard.agent
                tried.add(agent.id)
                try:
                    upstream = await self._upstream.send(agent, request, body)
                except ConnectFailed as failure:
                    self._pool.trip(agent, f"cannot connect: {failure}")
                    last_error = errors.upstream_failed(f"{agent.name} is unreachable")
                    continue
                except UpstreamBroken as failure:
                    self._pool.trip(agent, str(failure))
                    last_error = errors.upstream_failed(str(failure))
                    continue
                if upstream.status < 500:
                    self._pool.record_success(agent)
                else:
                    self._count_server_error(agent, upstream.status)
                    if not is_last:
                        detail = await discard(upstream)
                        log.info(
                            "%s %s: %s answered %d %r; retrying elsewhere",
                            request.method,
                            request.path,
                            agent.name,
                            upstream.status,
                            detail[:200],
                        )
                        continue
                # The last attempt's answer goes to the client as it is, even a 5xx: it is the
                # server's own account of what went wrong.
                relayed = await relay(request, upstream)
                if relayed.client_gone:
                    guard.release(abandoned=True)
                    log.info(
                        "%s %s via %s: the client went away",
                        request.method,
                        request.path,
                        agent.name,
                    )
                elif relayed.failure is not None:
                    self._pool.trip(agent, relayed.failure)
                    log.warning(
                        "%s %s via %s: %s",
                        request.method,
                        request.path,
                        agent.name,
                        relayed.failure,
                    )
                return relayed.response
        assert last_error is not None
        log.warning("%s %s: %s", request.method, request.path, last_error.message)
        return last_error.response()

    def _count_server_error(self, agent: AgentController, status: int) -> None:
        if status in _TRIPPING_STATUSES:
            self._pool.trip(agent, f"answered {status}")
        else:
            self._pool.record_failure(agent, f"answered {status}")

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within the per-request limit and the balancer's memory budget."""
        limit = self._config.max_request_body_size
        if request.content_length is not None and request.content_length > limit:
            raise errors.body_too_large(limit)
        chunks: list[bytes] = []
        taken = 0
        try:
            async for chunk in request.content.iter_any():
                if taken + len(chunk) > limit:
                    raise errors.body_too_large(limit)
                if not self._budget.take(len(chunk)):
                    raise errors.out_of_body_memory(self._budget.limit)
                taken += len(chunk)
                chunks.append(chunk)
        except BaseException:
            self._budget.give(taken)
            raise
        return b"".join(chunks)
