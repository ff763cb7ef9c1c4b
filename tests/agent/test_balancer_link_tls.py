"""The agent's link over TLS: it registers with a balancer whose certificate its CA signed, and
refuses, in one clear line, any other, before its token leaves."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest

from paddler.config import AgentConfig
from tests.agent.test_balancer_link import IDLE, LINK_LOGGER, agent_config, board_with, linked
from tests.support.balancer import RunningBalancer, running_balancer, wait_until
from tests.support.logs import watching
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.both_event_loops

TOKEN = "tls-token-77"


def tls_balancer(pki: Pki) -> contextlib.AbstractAsyncContextManager[RunningBalancer]:
    return running_balancer(
        management_token=TOKEN,
        management_tls_cert=pki.cert_file,
        management_tls_key=pki.key_file,
    )


def over_wss(port: int, ca_file: Path, host: str = "127.0.0.1") -> AgentConfig:
    return agent_config(
        port,
        management_host=host,
        management_scheme="https",
        management_ca_file=ca_file,
        management_token=TOKEN,
    )


async def test_the_agent_registers_over_wss_with_the_balancers_ca(tmp_path: Path) -> None:
    """--management-scheme https with --management-ca-file: verified, and registered."""
    pki = make_pki(tmp_path)
    async with tls_balancer(pki) as running:
        assert running.management_url.startswith("https://")
        async with linked(
            over_wss(running.balancer.management_port or 0, pki.ca_file), board_with(IDLE)
        ):
            await wait_until(lambda: len(running.pool.agents()) == 1)


async def test_the_agent_refuses_a_certificate_its_ca_did_not_sign(tmp_path: Path) -> None:
    """Another CA's certificate: an error line that says so and names the CA file; the
    balancer never hears from the agent."""
    balancers, other = make_pki(tmp_path, "balancer"), make_pki(tmp_path, "other")
    async with tls_balancer(balancers) as running:
        config = over_wss(running.balancer.management_port or 0, other.ca_file)
        with watching(LINK_LOGGER) as log:
            async with linked(config, board_with(IDLE)):
                (line,) = await log.wait_for(logging.ERROR)
        assert running.pool.agents() == []
    assert line.startswith(
        f"refusing the balancer at wss://127.0.0.1:{running.balancer.management_port}"
    )
    assert "certificate is not trusted (unable to get local issuer certificate)" in line
    assert f"--management-ca-file {other.ca_file}" in line


async def test_the_agent_refuses_a_certificate_for_another_host(tmp_path: Path) -> None:
    """Signed by the right CA, but not for the address the agent dials."""
    pki = make_pki(tmp_path, hosts=("balancer.example",))
    async with tls_balancer(pki) as running:
        config = over_wss(running.balancer.management_port or 0, pki.ca_file)
        with watching(LINK_LOGGER) as log:
            async with linked(config, board_with(IDLE)):
                (line,) = await log.wait_for(logging.ERROR)
        assert running.pool.agents() == []
    assert "certificate is not trusted (IP address mismatch" in line
    assert line.endswith("name the host 127.0.0.1; retrying until it works")


async def test_a_token_sent_in_clear_text_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    """ws:// to a public address with a token works as before, with a warning to use https."""
    config = agent_config(9, management_host="192.0.2.1", management_token=TOKEN)
    with watching(LINK_LOGGER) as log:
        async with linked(config, board_with(IDLE)):
            (line,) = await log.wait_for(logging.WARNING, containing="clear text")
    assert "--management-scheme https" in line
