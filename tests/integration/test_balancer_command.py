"""``paddler balancer`` as a process: it says when it is ready, and why it cannot start."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.support.llamacpp import stop_process
from tests.support.processes import clean_env, paddler_process


async def test_a_taken_port_ends_the_balancer_with_one_clear_line() -> None:
    """No traceback: the address, the reason, exit code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await paddler_process(
            "balancer", "--management-port=0", f"--reverseproxy-port={port}"
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    text = stderr.decode()
    assert "Traceback" not in text
    (error,) = [line for line in text.splitlines() if " ERROR " in line]
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error


async def _startup_lines(*flags: str) -> list[str]:
    """The balancer's log lines up to the proxy port's "listening" line; then it is stopped."""
    process = await paddler_process(
        "balancer", "--management-port=0", "--reverseproxy-port=0", *flags
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not lines or "reverseproxy listening" not in lines[-1]:
                line = await process.stderr.readline()
                assert line, f"the balancer exited: {lines}"
                lines.append(line.decode())
    finally:
        await stop_process(process)
    return lines


async def test_a_balancer_started_with_defaults_runs_on_uvloop() -> None:
    """Its first line names the loop it runs on: uvloop, with its version."""
    lines = await _startup_lines()
    assert "INFO paddler: event loop: uvloop 0." in lines[0]


async def test_event_loop_asyncio_runs_the_balancer_on_asyncio_s_own_loop() -> None:
    """``--event-loop asyncio`` (``PADDLER_EVENT_LOOP``) is the way out of uvloop."""
    lines = await _startup_lines("--event-loop", "asyncio")
    assert lines[0].rstrip().endswith("INFO paddler: event loop: asyncio")


async def test_the_balancer_tells_its_supervisor_when_it_listens(tmp_path: Path) -> None:
    """With NOTIFY_SOCKET set (systemd, paddler cluster), READY=1 arrives once both ports
    listen, and STOPPING=1 when it stops."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        notifications.bind(str(path))
        notifications.setblocking(False)
        process = await paddler_process(
            "balancer",
            "--management-port=0",
            "--reverseproxy-port=0",
            env=clean_env(NOTIFY_SOCKET=str(path)),
            stderr=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notifications, 4096), 30)
            assert ready.startswith(b"READY=1\n")
            assert b"proxy on port" in ready
            process.terminate()
            stopping = await asyncio.wait_for(loop.sock_recv(notifications, 4096), 30)
            assert stopping == b"STOPPING=1"
        finally:
            await stop_process(process)


async def test_a_balancer_whose_redis_cannot_be_reached_ends_with_one_clear_line() -> None:
    """``--state`` names a Redis nobody listens at: no traceback, the address (without its
    password), exit code 1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await paddler_process(
        "balancer",
        "--management-port=0",
        "--reverseproxy-port=0",
        f"--state=redis://:s3cret@127.0.0.1:{port}/0",
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    text = stderr.decode()
    assert "Traceback" not in text and "s3cret" not in text
    (error,) = [line for line in text.splitlines() if " ERROR " in line]
    assert f"cannot reach the shared state at redis://:***@127.0.0.1:{port}/0" in error
