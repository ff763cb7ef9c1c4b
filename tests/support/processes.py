"""Paddler's own commands as child processes, in an environment without the tester's settings."""

from __future__ import annotations

import asyncio
import os
import sys


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``PADDLER_*`` variable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PADDLER_")}
    env.update(extra)
    return env


async def paddler_process(
    *arguments: str, env: dict[str, str] | None = None, stderr: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """``python -m paddler ARGUMENTS`` with no stdin, its stderr piped (or ``stderr``), in
    ``env`` (``clean_env()`` by default)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        env=clean_env() if env is None else env,
    )
