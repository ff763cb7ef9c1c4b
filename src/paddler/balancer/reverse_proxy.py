"""The client-facing port: every llama.cpp route, passed through to a server that can take it.

A request is read whole first (it is bounded by ``--max-request-body-size``), so that it can be
sent again if the first server fails before answering. Then, up to ``1 + max_retries`` times:
reserve an agent (waiting in the buffer if none is free), send, and relay the answer.

A server that cannot be connected to, or that answers 502/503/504 before anything was relayed,
is taken out of rotation and the request goes to another server. Any other 5xx may be the
request's own fault: it is also retried elsewhere, but only repeated ones open the circuit, so
that a single poisonous request cannot empty the fleet. When no attempt is left, the client gets
the last server's own 5xx answer.

A request that names a model (``"model"`` in a JSON body, ``?model=`` otherwise) goes only to
agents that serve it; a model no agent serves gets 404, unless ``--allow-unknown-models``.
``GET /v1/models`` is answered here, from the agents' reports: the fleet's models.

For generations, the end of the response is kept as it is relayed, so that the routing policy
can learn what llama.cpp found in its prompt cache (see ``cache_report``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from paddler.balancer import errors
from paddler.balancer.agent_controller import AgentController
from paddler.balancer.agent_controller_pool import AgentControllerPool
from paddler.balancer.body_budget import BodyBudget
from paddler.balancer.cache_report import ResponseTail
from paddler.balancer.observers import Observers, Outcome, RequestRecord
from paddler.balancer.request_buffer import (
    BufferFull,
    BufferRejection,
    BufferTimeout,
    NoCandidates,
    RequestBuffer,
    ShuttingDown,
)
from paddler.balancer.request_id import request_id
from paddler.balancer.request_traits import inspect
from paddler.balancer.routes import needs_slot, route_label
from paddler.balancer.routing import Demand
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
_REJECTION_OUTCOMES: dict[type[BufferRejection], Outcome] = {
    BufferFull: Outcome.BUFFER_FULL,
    BufferTimeout: Outcome.BUFFER_TIMEOUT,
    ShuttingDown: Outcome.SHUTTING_DOWN,
    NoCandidates: Outcome.UPSTREAM_FAILED,
}


class ReverseProxy:
    def __init__(
        self,
        config: BalancerConfig,
        pool: AgentControllerPool,
        buffer: RequestBuffer,
        upstream: Upstream,
        observers: Observers,
    ) -> None:
        self._config = config
        self._observers = observers
        self._pool = pool
        self._buffer = buffer
        self._upstream = upstream
        self._budget = BodyBudget(config.request_body_memory)
        self._index_prompts = config.routing == "prefix"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_request_body_size)
        app.router.add_get("/health", self.health)
        for path in ("/v1/models", "/models"):
            app.router.add_get(path, self.models)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def models(self, request: web.Request) -> web.Response:
        """The fleet's models in OpenAI's list shape, with how many agents and slots each has."""
        data = []
        for model, agents in sorted(self._pool.models().items()):
            usable = [agent for agent in agents if agent.usable()]
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": int(min(agent.registered_at for agent in agents)),
                    "owned_by": "llamacpp",
                    "paddler": {
                        "agents": len(agents),
                        "agents_usable": len(usable),
                        "slots_total": sum(agent.slots_total for agent in usable),
                        "slots_idle": sum(agent.free_slots() for agent in usable),
                    },
                }
            )
        return web.json_response({"object": "list", "data": data})

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
        record = RequestRecord(
            id=request_id(request),
            method=request.method,
            path=request.path,
            route=route_label(request.path),
            needs_slot=needs_slot(request.method, request.path),
            client_headers=request.headers,
        )
        self._observers.request_started(record)
        try:
            try:
                body = await self._read_body(request)
            except errors.ApiError as error:
                record.outcome = Outcome.REFUSED
                return self._refuse(record, error)
            try:
                traits = inspect(request.method, request.path, request.query, body)
                model = traits.model
                if model is not None and not self._pool.serves(model):
                    if not self._config.allow_unknown_models:
                        record.outcome = Outcome.REFUSED
                        log.info("request %s: unknown model %r", record.id, model[:200])
                        return self._refuse(record, errors.unknown_model(model[:200]))
                    model = None
                record.model = model
                demand = Demand.of(
                    record.needs_slot, model, traits.prompt if self._index_prompts else None
                )
                return await self._dispatch(request, body, record, demand)
            finally:
                self._budget.give(len(body))
        except asyncio.CancelledError:
            record.outcome = record.outcome or Outcome.CLIENT_GONE
            raise
        finally:
            record.ended = time.perf_counter()
            self._observers.request_finished(record)

    async def _dispatch(
        self, request: web.Request, body: bytes, record: RequestRecord, demand: Demand
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._buffer.timeout
        tried: set[str] = set()
        last_error: errors.ApiError | None = None
        for attempt in range(self._config.max_retries + 1):
            is_last = attempt == self._config.max_retries
            self._observers.buffer_wait_started(record)
            waiting_since = time.perf_counter()
            try:
                demand.exclude = frozenset(tried)
                guard = await self._buffer.acquire(demand, deadline=deadline)
            except BufferRejection as rejection:
                record.outcome = _REJECTION_OUTCOMES.get(type(rejection), Outcome.UPSTREAM_FAILED)
                if isinstance(rejection, NoCandidates) and last_error is not None:
                    return self._refuse(record, last_error)
                return self._refuse(record, errors.from_buffer(rejection))
            finally:
                record.buffer_wait += time.perf_counter() - waiting_since
                self._observers.buffer_wait_ended(record)
            with guard:
                agent = guard.agent
                tried.add(agent.id)
                record.agent = agent
                record.attempts += 1
                if attempt:
                    self._observers.retried(record, agent)
                self._observers.upstream_started(record, agent)
                headers: dict[str, str] = {}
                self._observers.upstream_headers(record, headers)
                try:
                    upstream = await self._upstream.send(agent, request, body, headers)
                except ConnectFailed as failure:
                    self._pool.trip(agent, f"cannot connect: {failure}")
                    self._observers.upstream_failed(record, agent, "connect_failed")
                    last_error = errors.upstream_failed(f"{agent.name} is unreachable")
                    continue
                except UpstreamBroken as failure:
                    self._pool.trip(agent, str(failure))
                    self._observers.upstream_failed(record, agent, "disconnected")
                    last_error = errors.upstream_failed(str(failure))
                    continue
                if upstream.status < 500:
                    self._pool.record_success(agent)
                else:
                    self._count_server_error(agent, upstream.status)
                    if not is_last:
                        self._observers.upstream_failed(record, agent, f"status_{upstream.status}")
                        detail = await discard(upstream)
                        log.info(
                            "request %s: %s answered %d %r; retrying elsewhere",
                            record.id,
                            agent.name,
                            upstream.status,
                            detail[:200],
                        )
                        continue
                # The last attempt's answer goes to the client as it is, even a 5xx: it is the
                # server's own account of what went wrong.
                record.status = upstream.status
                tail = ResponseTail() if record.needs_slot and upstream.status == 200 else None
                relayed = await relay(
                    request,
                    upstream,
                    extra_headers=self._response_headers(record, agent),
                    on_first_chunk=lambda: self._first_chunk(record),
                    on_chunk=tail.feed if tail is not None else None,
                )
                if relayed.client_gone:
                    guard.release(abandoned=True)
                    record.outcome = Outcome.CLIENT_GONE
                elif relayed.failure is not None:
                    self._pool.trip(agent, relayed.failure)
                    self._observers.upstream_failed(record, agent, "broke_mid_response")
                    record.outcome = Outcome.UPSTREAM_FAILED
                    log.warning("request %s via %s: %s", record.id, agent.name, relayed.failure)
                else:
                    record.outcome = Outcome.COMPLETED
                    if tail is not None:
                        record.cache = tail.cache_report()
                        if record.cache is not None:
                            self._pool.policy.learn(agent, demand, record.cache)
                return relayed.response
        assert last_error is not None
        record.outcome = Outcome.UPSTREAM_FAILED
        return self._refuse(record, last_error)

    def _first_chunk(self, record: RequestRecord) -> None:
        record.first_chunk_at = time.perf_counter()
        self._observers.first_chunk(record)

    def _response_headers(self, record: RequestRecord, agent: AgentController) -> dict[str, str]:
        headers = {"X-Request-Id": record.id}
        if self._config.agent_header:
            headers["X-Paddler-Agent"] = agent.name
        return headers

    def _refuse(self, record: RequestRecord, error: errors.ApiError) -> web.Response:
        record.status = error.status
        response = error.response()
        response.headers["X-Request-Id"] = record.id
        return response

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
