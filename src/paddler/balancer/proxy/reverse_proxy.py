"""The client-facing port: every llama.cpp route, passed through to a server that can take it.

A request is read whole first (it is bounded by ``--max-request-body-size``), so that it can be
sent again if the first server fails before answering. Then, up to ``1 + max_retries`` times:
reserve an agent (waiting in the buffer if none is free), send, judge the answer and either relay
it or try another server. Whose fault an answer is, and therefore whether it is retried and
whether it counts against the server, is decided in ``verdict`` alone; what the client gets when
every attempt failed, in ``attempts``.

A request that names a model (``"model"`` in a JSON body, ``?model=`` otherwise) goes only to
agents that serve it, when some do; see ``agent_controller_pool`` for names no agent answers to.

For generations, the end of the response is kept as it is relayed, so that the routing policy
can learn what llama.cpp found in its prompt cache (see ``cache_report``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable

from paddler.balancer import errors
from paddler.balancer.fleet.agent_controller import AgentController
from paddler.balancer.fleet.request_buffer import (
    BufferFull,
    BufferRejection,
    BufferTimeout,
    NoCandidates,
    ShuttingDown,
    UnknownModel,
)
from paddler.balancer.fleet.slot_guard import SlotGuard
from paddler.balancer.fleet.state import Fleet
from paddler.balancer.observability.observers import Observers, Outcome, RequestRecord
from paddler.balancer.proxy.api_keys import ApiKeys
from paddler.balancer.proxy.attempts import Attempts, Failure
from paddler.balancer.proxy.body_budget import BodyBudget
from paddler.balancer.proxy.client_auth import ClientAuth
from paddler.balancer.proxy.client_exchange import Answer, ClientRequest, error_answer, json_answer
from paddler.balancer.proxy.model_listing import ModelListing
from paddler.balancer.proxy.request_id import request_id
from paddler.balancer.proxy.routes import needs_slot, route_label
from paddler.balancer.proxy.upstream import (
    ConnectFailed,
    Upstream,
    UpstreamBroken,
    hold,
    interrupt,
    relay,
)
from paddler.balancer.proxy.upstream_http.response import UpstreamResponse
from paddler.balancer.proxy.verdict import NOT_IMPLEMENTED, Action, Fault, judge
from paddler.balancer.routing.cache_report import ResponseTail
from paddler.balancer.routing.policies import Demand
from paddler.balancer.routing.traits_reader import TraitsReader
from paddler.config import BalancerConfig

log = logging.getLogger(__name__)

_OWN_METHODS = frozenset({"GET", "HEAD"})
_NONE_TRIED: frozenset[str] = frozenset()
"""The exclusion of a first attempt, shared: each waiting request would hold a copy."""
_LISTING_PATHS = frozenset({"/v1/models", "/models"})

_REJECTION_OUTCOMES: dict[type[BufferRejection], Outcome] = {
    BufferFull: Outcome.BUFFER_FULL,
    BufferTimeout: Outcome.BUFFER_TIMEOUT,
    ShuttingDown: Outcome.SHUTTING_DOWN,
    UnknownModel: Outcome.REFUSED,
}


class ReverseProxy:
    def __init__(
        self,
        config: BalancerConfig,
        fleet: Fleet,
        upstream: Upstream,
        observers: Observers,
        traits: TraitsReader,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self._config = config
        self._traits = traits
        self._api_keys = api_keys
        self._observers = observers
        self._fleet = fleet
        self._upstream = upstream
        self._budget = BodyBudget(config.request_body_memory)
        self._index_prompts = config.routing == "prefix"
        self._auth = (
            ClientAuth(api_keys, self._unauthorized)
            if api_keys is not None and api_keys.enabled
            else None
        )
        self._listing = ModelListing(fleet)
        # Made on the loop that serves it, and kept: Python 3.11 looks the running loop up with
        # a getpid system call.
        self._loop = asyncio.get_running_loop()

    def handle(self, request: ClientRequest) -> Awaitable[Answer | None]:
        """Answer ``request`` (whichever server read it): the whole answer, or None once it
        was relayed on a ``ClientStream``. ``/health`` and the model list are the
        balancer's own; everything else goes to a llama.cpp server.

        Not a coroutine itself: it returns the one that answers, so that a request's chain of
        frames (which a buffered request holds while it waits) is one frame shorter."""
        if self._auth is not None:
            refusal = self._auth.refusal(request)
            if refusal is not None:
                return _at_once(refusal)
        if request.method in _OWN_METHODS:
            path = request.path
            if path == "/health":
                return self.health()
            if path in _LISTING_PATHS:
                return self._listing.answer()
        return self.forward(request)

    def _unauthorized(self, request: ClientRequest) -> None:
        self._observers.unauthorized(request.path)

    async def health(self) -> Answer:
        """Aggregate slots of usable agents; 503 while no agent can serve a request."""
        fleet = await self._fleet.health()
        ok = fleet.usable_agents > 0
        return json_answer(
            {
                "status": "ok" if ok else "no_usable_agents",
                "slots_idle": fleet.slots_idle,
                "slots_processing": fleet.slots_processing,
                "requests_buffered": fleet.requests_buffered,
            },
            status=200 if ok else 503,
        )

    async def forward(self, request: ClientRequest) -> Answer | None:
        record = RequestRecord(
            id=request_id(request),
            method=request.method,
            path=request.path,
            route=route_label(request.path),
            needs_slot=needs_slot(request.method, request.path),
            client_headers=request.headers,
            key_id=request.key_id,
        )
        self._observers.request_started(record)
        try:
            try:
                body = await self._read_body(request)
            except errors.ApiError as error:
                record.outcome = Outcome.REFUSED
                answer = self._refuse(record, error)
                if error.status == 408:
                    log.info("request %s: %s", record.id, error.message)
                    answer.close = True  # the rest of the body may never come
                return answer
            try:
                traits = await self._traits.read(request.method, request.path, request.query, body)
                model = traits.model
                if model is not None and not self._fleet.accepts(model):
                    record.outcome = Outcome.REFUSED
                    log.info("request %s: unknown model %r", record.id, model[:200])
                    return self._refuse(
                        record, errors.unknown_model(model[:200], self._fleet.model_ids())
                    )
                record.model = model
                demand = Demand.of(
                    record.needs_slot,
                    model,
                    traits.prompt if self._index_prompts else None,
                    record.route,
                    traits.prompt_chars,
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
        self, request: ClientRequest, body: bytes, record: RequestRecord, demand: Demand
    ) -> Answer | None:
        deadline = self._loop.time() + self._fleet.buffer_timeout
        attempts = Attempts()
        for attempt in range(self._config.max_retries + 1):
            is_last = attempt == self._config.max_retries
            # The reservation, inline: a coroutine less per request, and a frame less held
            # by each buffered one.
            self._observers.buffer_wait_started(record)
            waiting_since = time.perf_counter()
            try:
                demand.exclude = frozenset(attempts.tried) if attempts.tried else _NONE_TRIED
                guard = self._fleet.acquire_now(demand)
                if guard is None:
                    guard = await self._fleet.wait(demand, deadline)
            except BufferRejection as rejection:
                if isinstance(rejection, NoCandidates):
                    break  # every server was tried: the client hears what each one did
                record.outcome = _REJECTION_OUTCOMES.get(type(rejection), Outcome.UPSTREAM_FAILED)
                return self._refuse(record, errors.from_buffer(rejection))
            finally:
                record.buffer_wait += time.perf_counter() - waiting_since
                self._observers.buffer_wait_ended(record)
            with guard:
                agent = guard.agent
                attempts.sent_to(agent)
                record.agent = agent
                record.attempts += 1
                if attempt:
                    self._observers.retried(record, agent)
                self._observers.upstream_started(record, agent)
                headers: dict[str, str] = {}
                self._observers.upstream_headers(record, headers)
                try:
                    upstream = await self._upstream.send(agent, request, body, headers, guard)
                except ConnectFailed as failure:
                    self._server_failed(record, attempts, agent, f"cannot connect: {failure}")
                    self._observers.upstream_failed(record, agent, "connect_failed")
                    continue
                except UpstreamBroken as failure:
                    self._server_failed(record, attempts, agent, str(failure))
                    self._observers.upstream_failed(record, agent, "disconnected")
                    continue
                # From now on an abort (the agent reports llama.cpp gone) fails the next read.
                guard.on_abort(functools.partial(interrupt, upstream))
                guard.received = upstream.content
                status = upstream.status
                if status == NOT_IMPLEMENTED and demand.route is not None:
                    self._fleet.lacks_route(agent, demand.route)
                verdict = judge(
                    status,
                    failed_elsewhere=attempts.failed_elsewhere,
                    # Asked only of 5xx answers: it walks the fleet.
                    can_retry=status >= 500
                    and not is_last
                    and await self._fleet.has_candidates(
                        attempts.tried,
                        demand.model,
                        demand.route if status == NOT_IMPLEMENTED else None,
                    ),
                )
                if verdict.action is Action.RETRY:
                    answer, cause = await hold(upstream, agent.name)
                    self._observers.upstream_failed(record, agent, f"status_{status}")
                    if verdict.fault is Fault.SERVER:
                        self._server_failed(record, attempts, agent, cause)
                    else:
                        attempts.failed(Failure(agent, verdict.fault, cause, answer))
                        log.info(
                            "request %s: %s %s; trying another server",
                            record.id,
                            agent.name,
                            cause[:300],
                        )
                    continue
                self._credit(agent, verdict.fault, attempts, demand)
                record.fault = verdict.fault
                return await self._relay(request, record, guard, upstream, demand)
        return self._give_up(record, attempts)

    def _server_failed(
        self, record: RequestRecord, attempts: Attempts, agent: AgentController, cause: str
    ) -> None:
        """Evidence against the server: out of rotation, and the request goes elsewhere."""
        self._fleet.trip(agent, cause)
        attempts.failed(Failure(agent, Fault.SERVER, cause))
        log.info("request %s: %s %s", record.id, agent.name, cause[:300])

    def _credit(
        self, agent: AgentController, fault: Fault, attempts: Attempts, demand: Demand
    ) -> None:
        """Count an answer that is about to be relayed for or against the servers involved."""
        if fault is Fault.NONE:
            self._fleet.record_success(agent)
            if demand.route is not None:
                self._fleet.offers_route(agent, demand.route)
            # Served here, failed there: that was the other servers' fault.
            for suspect in attempts.suspects():
                self._fleet.record_failure(suspect.agent, f"{suspect.cause} (served elsewhere)")
        elif fault is Fault.REQUEST and not attempts.failed_elsewhere:
            self._fleet.record_success(agent)  # it answered, and sanely: a 4xx or a 501

    async def _relay(
        self,
        request: ClientRequest,
        record: RequestRecord,
        guard: SlotGuard,
        upstream: UpstreamResponse,
        demand: Demand,
    ) -> Answer | None:
        agent = guard.agent
        record.status = upstream.status
        tail = ResponseTail() if record.needs_slot and upstream.status == 200 else None
        relayed = await relay(
            request,
            upstream,
            extra_headers=self._response_headers(record, agent.name),
            on_first_chunk=lambda: self._first_chunk(record),
            on_chunk=tail.feed if tail is not None else None,
            read_timeout=self._upstream.read_timeout,
        )
        if relayed.client_gone:
            guard.release(abandoned=True)
            record.outcome = Outcome.CLIENT_GONE
        elif relayed.failure is not None:
            self._fleet.trip(agent, relayed.failure)
            self._observers.upstream_failed(record, agent, "broke_mid_response")
            record.outcome = Outcome.UPSTREAM_FAILED
            log.warning("request %s via %s: %s", record.id, agent.name, relayed.failure)
        else:
            record.outcome = Outcome.COMPLETED
            if tail is not None:
                record.cache = tail.cache_report()
                if record.cache is not None:
                    self._fleet.learn(guard, demand, record.cache)
        return relayed.answer

    def _give_up(self, record: RequestRecord, attempts: Attempts) -> Answer:
        """No attempt left: llama.cpp's own answer if one was kept, else every cause."""
        kept = attempts.best_answer()
        if kept is not None and kept.answer is not None:
            record.status = kept.answer.status
            record.outcome = Outcome.COMPLETED
            record.fault = kept.fault
            return kept.answer.answer(self._response_headers(record, kept.answer.agent_name))
        record.outcome = Outcome.UPSTREAM_FAILED
        error = attempts.summary()
        log.warning("request %s: %s", record.id, error.message)
        return self._refuse(record, error)

    def _first_chunk(self, record: RequestRecord) -> None:
        record.first_chunk_at = time.perf_counter()
        self._observers.first_chunk(record)

    def _response_headers(self, record: RequestRecord, agent_name: str) -> dict[str, str]:
        headers = {"X-Request-Id": record.id}
        if self._config.agent_header:
            headers["X-Paddler-Agent"] = agent_name
        return headers

    def _refuse(self, record: RequestRecord, error: errors.ApiError) -> Answer:
        record.status = error.status
        answer = error_answer(error)
        answer.headers["X-Request-Id"] = record.id
        return answer

    async def _read_body(self, request: ClientRequest) -> bytes:
        """The whole body, within the per-request limit and the balancer's memory budget.

        Each chunk must arrive within ``client_body_timeout`` of the one before (of the head,
        for the first), or the request is refused with 408.
        """
        limit = self._config.max_request_body_size
        idle = self._config.client_body_timeout
        if request.content_length is not None and request.content_length > limit:
            raise errors.body_too_large(limit)
        chunks: list[bytes] = []
        taken = 0
        content = request.content
        try:
            while True:
                if content.is_eof():
                    # All of it has arrived (nearly every request, by the time it is handled):
                    # nothing to wait for, so no timer.
                    chunk = await content.readany()
                else:
                    try:
                        async with asyncio.timeout(idle):
                            chunk = await content.readany()
                    except TimeoutError:
                        raise errors.body_stalled(idle) from None
                if not chunk:
                    break
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


async def _at_once(answer: Answer) -> Answer:
    return answer
