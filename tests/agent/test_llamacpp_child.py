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


async def embeddings_status(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.post(f"{url}/v1/embeddings", json={"input": "hello"}) as response:
        return response.status, await response.json()


async def test_child_passes_llamacpp_options_after_the_separator(
    tiny_model: Path, session: aiohttp.ClientSession
) -> None:
    """With ``-- --embeddings --pooling mean`` llama.cpp serves embeddings; without, it answers 501."""
    async with running_llamacpp(
        tiny_model, extra_args=("--embeddings", "--pooling", "mean")
    ) as server:
        status, body = await embeddings_status(session, server.url)
    assert status == 200
    assert isinstance(body, dict)
    vector = body["data"][0]["embedding"]
    assert len(vector) > 0 and all(isinstance(value, float) for value in vector)
    async with running_llamacpp(tiny_model) as server:
        status, _ = await embeddings_status(session, server.url)
    assert status == 501


async def run_child_to_exit(tiny_model: Path, *extra: str) -> tuple[int | None, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler.agent.llamacpp_child",
        "--model",
        str(tiny_model),
        "--",
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            output, errors = await process.communicate()
    finally:
        await stop_process(process)
    return process.returncode, output, errors


async def test_child_refuses_an_unknown_llamacpp_option_without_starting(tiny_model: Path) -> None:
    """An option llama-server does not have: status 2 and one line naming it, and no llama.cpp."""
    code, output, errors = await run_child_to_exit(tiny_model, "--embeddings", "--foo")
    assert code == 2
    assert output == b""
    lines = errors.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("unknown llama.cpp option '--foo' (the embedded llama.cpp server")


async def test_child_refuses_an_option_value_it_cannot_use_before_loading_the_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A --chat-template-file that does not exist: status 2 and one line, before llama.cpp logs."""
    missing = tmp_path / "missing.jinja"
    code, output, errors = await run_child_to_exit(tiny_model, "--chat-template-file", str(missing))
    assert code == 2
    assert output == b""
    assert errors.decode().splitlines() == [
        f"llama.cpp option --chat-template-file cannot be applied: "
        f"[Errno 2] No such file or directory: '{missing}'"
    ]
