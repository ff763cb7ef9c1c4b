"""The terminal dashboard against a management port with TLS: verified with the CA given."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from paddler.dashboard.app import DashboardApp
from paddler.dashboard.config import DashboardConfig
from tests.dashboard.test_dashboard_app import rows, status
from tests.support.balancer import ScriptedAgent, ok, running_balancer, wait_until
from tests.support.tls import make_pki


async def test_the_dashboard_reads_an_https_management_port_with_its_ca(tmp_path: Path) -> None:
    """With --management-scheme https and the CA, the fleet shows; with another CA it does
    not, and the status line says the certificate is why."""
    pki, other = make_pki(tmp_path, "balancer"), make_pki(tmp_path, "other")
    async with (
        running_balancer(
            management_tls_cert=pki.cert_file, management_tls_key=pki.key_file
        ) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as session,
    ):
        agent = ScriptedAgent(session, running.management_url)
        await agent.register("alpha", 9001, ok(idle=2), verified=False)
        for ca_file, shown in ((pki.ca_file, True), (other.ca_file, False)):
            config = DashboardConfig(
                management_port=running.balancer.management_port or 0,
                refresh_interval=0.05,
                management_scheme="https",
                management_ca_file=ca_file,
            )
            async with DashboardApp(config).run_test(size=(160, 40)) as pilot:
                if shown:
                    await wait_until(lambda: "alpha" in rows(pilot))
                else:
                    await wait_until(lambda: "unreachable" in status(pilot))
                    assert "certificate verify failed" in status(pilot)
                    assert rows(pilot) == {}
        await agent.close()
