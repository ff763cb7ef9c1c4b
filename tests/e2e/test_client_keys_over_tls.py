"""Client API keys and TLS on both ports, against real llama.cpp with a key of its own, a real
agent that verifies the balancer's certificate, and the official ``openai`` SDK."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paddler.balancer.proxy.api_keys import key_id
from tests.support.agent import running_agent
from tests.support.balancer import RunningBalancer, running_balancer, wait_until
from tests.support.llamacpp import LlamaCppServer, running_llamacpp
from tests.support.logs import LogWatcher, watching
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.both_event_loops

CLIENT_KEY = "client-key-0123456789abcdef"
LLAMACPP_KEY = "llamacpp-own-key-fedcba9876543210"
TOKEN = "management-token-5555"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
CHAT = {"messages": MESSAGES, "max_tokens": 4}


@dataclass
class SecuredFleet:
    running: RunningBalancer
    server: LlamaCppServer
    pki: Pki
    requests_log: LogWatcher
    exporter: InMemorySpanExporter

    def openai(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.running.proxy_url}/v1",
            api_key=api_key,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(verify=self.pki.client_context()),
        )


@pytest.fixture
async def secured(
    tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter
) -> AsyncIterator[SecuredFleet]:
    """A balancer with a client key, TLS on both ports and llama.cpp's key; llama.cpp with that
    key; an agent that reaches the management port over wss:// with the test CA."""
    pki = make_pki(tmp_path)
    with watching("paddler.requests") as requests_log:
        async with contextlib.AsyncExitStack() as stack:
            running = await stack.enter_async_context(
                running_balancer(
                    tracer_provider=provider,
                    management_token=TOKEN,
                    api_keys=(CLIENT_KEY,),
                    llamacpp_api_key=LLAMACPP_KEY,
                    reverseproxy_tls_cert=pki.cert_file,
                    reverseproxy_tls_key=pki.key_file,
                    management_tls_cert=pki.cert_file,
                    management_tls_key=pki.key_file,
                )
            )
            server = await stack.enter_async_context(running_llamacpp(api_key=LLAMACPP_KEY))
            await stack.enter_async_context(
                running_agent(
                    llamacpp_port=server.port,
                    management_port=running.balancer.management_port or 0,
                    name="agent-tls",
                    token=TOKEN,
                    extra=(
                        "--management-scheme=https",
                        f"--management-ca-file={pki.ca_file}",
                        f"--local-llamacpp-api-key={LLAMACPP_KEY}",
                    ),
                )
            )
            await wait_until(
                lambda: sum(agent.usable() for agent in running.pool.agents()) == 1, timeout=30
            )
            yield SecuredFleet(running, server, pki, requests_log, exporter)


async def test_a_client_with_a_key_gets_completions_streamed_or_not_over_tls(
    secured: SecuredFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The openai SDK with the key and the test CA gets a chat completion and a stream of one,
    although llama.cpp wants a key the client does not know: the balancer sends its own.
    The CA works given to the HTTP client, or through SSL_CERT_FILE as docs/security.md says."""
    client = secured.openai(CLIENT_KEY)
    completion = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert completion.choices[0].message.content is not None
    stream = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    await client.close()
    monkeypatch.setenv("SSL_CERT_FILE", str(secured.pki.ca_file))
    plain = openai.AsyncOpenAI(
        base_url=f"{secured.running.proxy_url}/v1", api_key=CLIENT_KEY, max_retries=0
    )
    assert (
        await plain.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    ).choices
    await plain.close()


async def test_a_wrong_key_and_no_key_get_llamacpps_own_401(secured: SecuredFleet) -> None:
    """Both get 401 with the very body llama.cpp itself answers a request without its key,
    and neither the log nor the refusal repeats the wrong key."""
    wrong = secured.openai("not-the-key")
    with pytest.raises(openai.AuthenticationError) as refused:
        await wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    await wrong.close()
    assert refused.value.status_code == 401
    tls = secured.pki.client_context()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{secured.server.url}/v1/models") as direct:
            llamacpps_own = await direct.json()
        async with session.post(
            f"{secured.running.proxy_url}/v1/chat/completions", json=CHAT, ssl=tls
        ) as keyless:
            assert keyless.status == 401
            assert await keyless.json() == llamacpps_own
    assert json.loads(refused.value.response.text) == llamacpps_own
    assert llamacpps_own == {
        "error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}
    }
    refusals = secured.requests_log.messages(logging.WARNING, "-> 401")
    assert len(refusals) == 2
    assert "not-the-key" not in " ".join(refusals)


async def test_health_is_public_and_the_x_api_key_header_is_accepted(
    secured: SecuredFleet,
) -> None:
    """/health needs no key (as llama.cpp's); X-Api-Key carries a key as Authorization does."""
    tls = secured.pki.client_context()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{secured.running.proxy_url}/health", ssl=tls) as health:
            assert health.status == 200
        async with session.post(
            f"{secured.running.proxy_url}/v1/chat/completions",
            json=CHAT,
            headers={"X-Api-Key": CLIENT_KEY},
            ssl=tls,
        ) as answer:
            assert answer.status == 200, await answer.text()


async def test_each_request_logs_and_traces_its_key_id_and_never_the_key(
    secured: SecuredFleet,
) -> None:
    """The request line and its span carry the key's id; no log line carries the key."""
    client = secured.openai(CLIENT_KEY)
    await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    await client.close()
    (record,) = [
        record
        for record in secured.requests_log.records
        if record.getMessage().startswith("request ") and "via agent-tls" in record.getMessage()
    ]
    assert record.__dict__["key_id"] == key_id(CLIENT_KEY)
    assert f"key {key_id(CLIENT_KEY)}" in record.getMessage()
    assert all(CLIENT_KEY not in entry.getMessage() for entry in secured.requests_log.records)
    (span,) = [s for s in secured.exporter.get_finished_spans() if s.name.startswith("POST ")]
    assert span.attributes is not None
    assert span.attributes["paddler.api_key.id"] == key_id(CLIENT_KEY)
