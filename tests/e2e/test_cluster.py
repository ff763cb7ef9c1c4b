"""``paddler cluster``: the README's first command, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.balancer import wait_until
from tests.support.llamacpp import stop_process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    living.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return living


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[asyncio.subprocess.Process, int, str]]:
    proxy_port, management_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PADDLER_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        "--servers=2",
        "--slots=2",
        f"--reverseproxy-port={proxy_port}",
        f"--management-port={management_port}",
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    banner = []
    try:
        async with asyncio.timeout(60):
            while line := (await process.stdout.readline()).decode():
                banner.append(line)
                if line.startswith("Press Ctrl-C"):
                    break
        yield process, proxy_port, "".join(banner)
    finally:
        await stop_process(process)


async def test_cluster_serves_requests_and_prints_ready_to_paste_examples(
    cluster: tuple[asyncio.subprocess.Process, int, str],
) -> None:
    """The cluster comes up on defaults, prints its URL and examples, and answers."""
    _, proxy_port, banner = cluster
    url = f"http://127.0.0.1:{proxy_port}"
    assert url in banner
    assert "curl -s" in banner
    assert "from openai import OpenAI" in banner
    assert "/dashboard" in banner
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert await response.json() == {
                "status": "ok",
                "slots_idle": 4,
                "slots_processing": 0,
                "requests_buffered": 0,
            }
        management = banner.split("dashboard:", 1)[1].split()[0]
        async with session.get(management) as response:
            assert response.status == 200
            assert "text/html" in response.headers["Content-Type"]
        async with session.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "paddler-tiny",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 16,
            },
        ) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] >= 1


async def test_ctrl_c_stops_every_process_of_the_cluster(
    cluster: tuple[asyncio.subprocess.Process, int, str],
) -> None:
    """SIGINT ends the cluster cleanly and leaves no balancer, agent or llama.cpp behind."""
    process, _, _ = cluster
    children = descendants(process.pid)
    assert len(children) >= 5  # balancer, 2 agents, 2 llama.cpp servers
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    await wait_until(lambda: not alive(children), timeout=10)


async def test_a_killed_cluster_leaves_no_orphans(
    cluster: tuple[asyncio.subprocess.Process, int, str],
) -> None:
    """Even SIGKILL, which the cluster cannot handle, takes every child down with it."""
    process, _, _ = cluster
    children = descendants(process.pid)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await wait_until(lambda: not alive(children), timeout=15)
