"""Real ``paddler agent`` processes for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

from tests.support.llamacpp import stop_process
from tests.support.processes import clean_env


@contextlib.asynccontextmanager
async def running_agent(
    *,
    llamacpp_port: int,
    management_port: int,
    name: str,
    token: str | None = None,
    extra: tuple[str, ...] = (),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``paddler agent`` watching the llama.cpp at ``llamacpp_port`` until the block ends."""
    env = clean_env()
    if token:
        env["PADDLER_MANAGEMENT_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        "agent",
        f"--local-llamacpp-port={llamacpp_port}",
        f"--management-port={management_port}",
        f"--name={name}",
        "--monitoring-interval=100ms",
        *extra,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        await stop_process(process)
