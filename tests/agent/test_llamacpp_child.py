"""The llama.cpp child process: its ready line, and the ways it refuses to be orphaned."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.llamacpp import running_llamacpp, stop_process

pytestmark = pytest.mark.llamacpp


async def test_child_serves_at_the_url_of_its_ready_line(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """The URL on the ready line answers /health."""
    async with running_llamacpp(tiny_model) as server:
        response = await session.get(f"{server.url}/health")
        response.release()
    assert response.status == 200


async def test_child_exits_when_its_stdin_closes(tiny_model: Path) -> None:
    """End of file on stdin, which is what the parent's death looks like, stops the child."""
    async with running_llamacpp(tiny_model) as server:
        assert server.process.stdin is not None
        server.process.stdin.close()
        async with asyncio.timeout(10):
            assert await server.process.wait() == 0


async def test_child_exits_at_once_when_its_parent_is_not_who_it_expects(
    tiny_model: Path,
) -> None:
    """A child whose parent already died (a different parent pid) never starts llama.cpp."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler.agent.llamacpp_child",
        "--model",
        str(tiny_model),
        "--parent-pid",
        "1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(10):
            output, _ = await process.communicate()
    finally:
        await stop_process(process)
    assert process.returncode == 0
    assert output == b""
