"""A real Prometheus server (Debian's ``prometheus`` binary) scraping the balancer, and metric text.

``running_prometheus`` starts Prometheus as a child of the test with a scrape config of its own,
waits for ``/-/ready`` and stops it (SIGTERM, then SIGKILL) when the block ends. Only the binary is
used: no system service is involved. ``scripts/test`` installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.llamacpp import stop_process

INSTALL_HINT = "install it with ./scripts/test, or: apt-get install prometheus"


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, if there is one."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and labels.items() <= found.labels.items():
                return float(found.value)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningPrometheus:
    url: str
    session: aiohttp.ClientSession
    log: Path

    async def query(self, expression: str) -> list[dict[str, Any]]:
        """The result vector of an instant query."""
        async with self.session.get(
            f"{self.url}/api/v1/query", params={"query": expression}
        ) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    async def value(self, expression: str) -> float | None:
        """The single value of an instant query, or None while it has no result."""
        result = await self.query(expression)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


@contextlib.asynccontextmanager
async def running_prometheus(
    session: aiohttp.ClientSession, directory: Path, targets: list[str], ready_timeout: float = 20
) -> AsyncIterator[RunningPrometheus]:
    """Prometheus scraping ``targets`` (``host:port``, path /metrics) every second."""
    binary = shutil.which("prometheus")
    assert binary is not None, f"the prometheus binary is not installed: {INSTALL_HINT}"
    config = directory / "prometheus.yml"
    quoted = ", ".join(f"'{target}'" for target in targets)
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: paddler\n"
        f"    static_configs: [{{targets: [{quoted}]}}]\n"
    )
    address = f"127.0.0.1:{free_port()}"
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={address}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    try:
        running = RunningPrometheus(f"http://{address}", session, log)
        await _wait_ready(running, process, ready_timeout)
        yield running
    finally:
        await stop_process(process)


async def _wait_ready(
    running: RunningPrometheus, process: asyncio.subprocess.Process, timeout: float
) -> None:
    async with asyncio.timeout(timeout):
        while process.returncode is None:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with running.session.get(f"{running.url}/-/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"prometheus exited early:\n{running.log.read_text()}")
