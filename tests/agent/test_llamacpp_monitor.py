"""LlamaCppMonitor against real llama.cpp, and against fakes for what it cannot do on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from paddler.agent.llamacpp_monitor import LlamaCppMonitor
from paddler.protocol import LlamaCppState, Status
from tests.support.llamacpp import running_llamacpp
from tests.support.upstream import fake_upstream


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def observe_until(monitor: LlamaCppMonitor, wanted: object, timeout: float = 10.0) -> Status:
    """Observe repeatedly until the status satisfies ``wanted`` (a predicate)."""
    assert callable(wanted)
    async with asyncio.timeout(timeout):
        while True:
            status = await monitor.observe()
            if wanted(status):
                return status
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def long_completion(session: aiohttp.ClientSession, url: str) -> AsyncIterator[None]:
    """Keep one slot busy with a long completion for the duration of the block."""

    async def complete() -> None:
        body = {"prompt": "hello", "n_predict": 2000, "ignore_eos": True}
        async with session.post(f"{url}/completion", json=body) as response:
            await response.read()

    task = asyncio.create_task(complete())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait((task,))


@pytest.mark.llamacpp
async def test_monitor_reports_ok_with_all_slots_idle_and_the_model_alias(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """A fresh llama.cpp is ok, with every slot idle and its alias as the model name."""
    async with running_llamacpp(tiny_model, slots=3, alias="tiny") as server:
        status = await LlamaCppMonitor(session, server.url, None, 3.0).observe()
    assert status == Status(
        state=LlamaCppState.OK, slots_idle=3, slots_processing=0, models=("tiny",)
    )


@pytest.mark.llamacpp
async def test_monitor_reports_a_processing_slot_while_a_completion_runs(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """While a long completion runs, one slot is processing and the other idle."""
    async with running_llamacpp(tiny_model, slots=2) as server:
        monitor = LlamaCppMonitor(session, server.url, None, 3.0)
        async with long_completion(session, server.url):
            busy = await observe_until(monitor, lambda status: status.slots_processing == 1)
    assert busy.state is LlamaCppState.OK
    assert busy.slots_idle == 1


@pytest.mark.llamacpp
async def test_monitor_reports_unauthorized_without_the_right_api_key(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """A missing or wrong key is unauthorized and names the flag to set; the right key is ok."""
    async with running_llamacpp(tiny_model, api_key="right-key") as server:
        missing = await LlamaCppMonitor(session, server.url, None, 3.0).observe()
        wrong = await LlamaCppMonitor(session, server.url, "wrong-key", 3.0).observe()
        right = await LlamaCppMonitor(session, server.url, "right-key", 3.0).observe()
    for status in (missing, wrong):
        assert status.state is LlamaCppState.UNAUTHORIZED
        assert status.error is not None and "--local-llamacpp-api-key" in status.error
        assert status.slots_total == 0
    assert right.state is LlamaCppState.OK
    assert right.slots_idle == 2


@pytest.mark.llamacpp
async def test_monitor_reports_slots_disabled_when_llamacpp_runs_with_no_slots(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """llama.cpp started with --no-slots answers 501 on /slots: slots_disabled, models known."""
    async with running_llamacpp(tiny_model, alias="tiny", slots_endpoint=False) as server:
        status = await LlamaCppMonitor(session, server.url, None, 3.0).observe()
    assert status.state is LlamaCppState.SLOTS_DISABLED
    assert status.models == ("tiny",)
    assert status.error is not None and "--no-slots" in status.error


@pytest.mark.llamacpp
async def test_monitor_reads_props_again_after_llamacpp_was_unreachable(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """After an outage, a llama.cpp restarted on the same port with a new alias is seen as new;
    during it, the models it last served are still named."""
    async with running_llamacpp(tiny_model, alias="before") as server:
        monitor = LlamaCppMonitor(session, server.url, None, 3.0)
        first = await monitor.observe()
        port = server.port
    during = await monitor.observe()
    async with running_llamacpp(tiny_model, slots=3, alias="after", port=port):
        after = await monitor.observe()
    assert first.models == ("before",)
    assert during.state is LlamaCppState.UNREACHABLE
    assert during.models == ("before",)
    assert after == Status(state=LlamaCppState.OK, slots_idle=3, models=("after",))


async def test_monitor_reports_unreachable_on_a_closed_port(
    session: aiohttp.ClientSession,
) -> None:
    """Nothing listening is unreachable, with the address in the error."""
    url = f"http://127.0.0.1:{closed_port()}"
    status = await LlamaCppMonitor(session, url, None, 3.0).observe()
    assert status.state is LlamaCppState.UNREACHABLE
    assert status.error is not None and url in status.error


async def test_monitor_reports_unreachable_when_llamacpp_does_not_answer_in_time(
    session: aiohttp.ClientSession,
) -> None:
    """A server that stalls longer than the timeout is unreachable, not an error."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"status": "ok"})

    async with fake_upstream(stall, total_slots=None) as port:
        status = await LlamaCppMonitor(session, f"http://127.0.0.1:{port}", None, 0.2).observe()
        release.set()
    assert status.state is LlamaCppState.UNREACHABLE
    assert status.error is not None and "within 0.2s" in status.error


async def test_monitor_reports_loading_while_llamacpp_loads_the_model(
    session: aiohttp.ClientSession,
) -> None:
    """The 503 "Loading model" llama.cpp answers while it loads is reported as loading."""

    async def loading(request: web.Request) -> web.Response:
        error = {"message": "Loading model", "type": "unavailable_error", "code": 503}
        return web.json_response({"error": error}, status=503)

    async with fake_upstream(loading, total_slots=None) as port:
        status = await LlamaCppMonitor(session, f"http://127.0.0.1:{port}", None, 3.0).observe()
    assert status.state is LlamaCppState.LOADING


async def test_monitor_reports_an_error_with_the_status_and_message_of_a_failure(
    session: aiohttp.ClientSession,
) -> None:
    """Any other failing answer is an error that says which route failed, and how."""

    async def broken(request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        error = {"message": "something broke", "type": "server_error", "code": 500}
        return web.json_response({"error": error}, status=500)

    async with fake_upstream(broken, total_slots=None) as port:
        status = await LlamaCppMonitor(session, f"http://127.0.0.1:{port}", None, 3.0).observe()
    assert status.state is LlamaCppState.ERROR
    assert status.error == "GET /props answered HTTP 500: something broke"


async def test_monitor_sends_the_api_key_as_a_bearer_token(
    session: aiohttp.ClientSession,
) -> None:
    """Every request carries Authorization: Bearer <key> when a key is set."""
    seen: list[str | None] = []

    async def llamacpp(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.path == "/slots":
            return web.json_response([{"id": 0, "is_processing": True}])
        if request.path == "/props":
            return web.json_response({"total_slots": 1, "model_alias": "m"})
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "m"}, {"id": "other"}]})
        return web.json_response({"status": "ok"})

    async with fake_upstream(llamacpp, total_slots=None) as port:
        status = await LlamaCppMonitor(session, f"http://127.0.0.1:{port}", "k", 3.0).observe()
    assert status == Status(state=LlamaCppState.OK, slots_processing=1, models=("m", "other"))
    assert seen == ["Bearer k"] * 4


async def test_monitor_reports_unreachable_while_there_is_no_url() -> None:
    """A URL getter that returns None (no server yet) is unreachable, without any request."""
    async with aiohttp.ClientSession() as session:
        status = await LlamaCppMonitor(session, lambda: None, None, 3.0).observe()
    assert status.state is LlamaCppState.UNREACHABLE


async def test_concurrent_observations_survive_one_of_them_forgetting_the_props(
    session: aiohttp.ClientSession,
) -> None:
    """An observation still reading /slots when another one fails (and forgets /props) ends ok.

    A stopping agent observes once more to drain while its monitoring loop observes too; the
    loop's failure used to leave the other observation without props, an AttributeError.
    """
    first_in_slots, release_first = asyncio.Event(), asyncio.Event()
    slots_calls = 0

    async def llamacpp(request: web.Request) -> web.Response:
        nonlocal slots_calls
        if request.path == "/props":
            return web.json_response({"total_slots": 1, "model_alias": "m"})
        if request.path == "/slots":
            slots_calls += 1
            if slots_calls == 1:
                first_in_slots.set()
                await release_first.wait()
                return web.json_response([{"id": 0, "is_processing": False}])
            error = {"message": "stopping", "type": "server_error", "code": 500}
            return web.json_response({"error": error}, status=500)
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "m"}]})
        return web.json_response({"status": "ok"})

    async with fake_upstream(llamacpp, total_slots=None) as port:
        monitor = LlamaCppMonitor(session, f"http://127.0.0.1:{port}", None, 3.0)
        draining = asyncio.create_task(monitor.observe())
        await first_in_slots.wait()
        failed = await monitor.observe()
        release_first.set()
        drained = await draining
    assert failed.state is LlamaCppState.ERROR
    assert drained == Status(state=LlamaCppState.OK, slots_idle=1, models=("m",))
