"""``paddler balancer --workers N`` as a process: N workers on one port, stopped with it."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aiohttp

from tests.support.llamacpp import stop_process
from tests.support.processes import paddler_process

_LISTENING = re.compile(r"worker (\d+) \(pid (\d+)\) listening on port (\d+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_listen_on_one_port_and_stop_with_the_balancer() -> None:
    """Both workers join the port the balancer chose; it says it listens only then; /health
    answers there; one SIGTERM stops the balancer and every worker, cleanly."""
    process = await paddler_process(
        "balancer", "--management-port=0", "--reverseproxy-port=0", "--workers=2"
    )
    assert process.stderr is not None
    lines: list[str] = []
    workers: dict[int, tuple[int, int]] = {}
    try:
        async with asyncio.timeout(30):
            while not lines or "reverseproxy listening" not in lines[-1]:
                line = (await process.stderr.readline()).decode()
                assert line, f"the balancer exited: {lines}"
                lines.append(line)
                if found := _LISTENING.search(line):
                    workers[int(found[1])] = (int(found[2]), int(found[3]))
        assert sorted(workers) == [1, 2]
        port = int(lines[-1].rsplit(":", 1)[1])
        assert {listening for _, listening in workers.values()} == {port}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/health") as health,
        ):
            assert health.status == 503  # no agent yet
            assert (await health.json())["status"] == "no_usable_agents"
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await stop_process(process)
    assert process.returncode == 0
    text = rest.decode()
    assert "Traceback" not in text
    assert "worker 1 stopped" in text and "worker 2 stopped" in text
    for pid, _ in workers.values():
        assert not _alive(pid)


async def test_workers_out_of_range_is_a_usage_error() -> None:
    """``--workers 0`` is refused before anything starts."""
    process = await paddler_process("balancer", "--workers=0")
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "--workers" in stderr.decode()
