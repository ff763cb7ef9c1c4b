"""``paddler balancer --api-keys-file`` as a process: SIGHUP re-reads the file, and a bad file
keeps the keys it had."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.support.llamacpp import stop_process
from tests.support.processes import paddler_process


class Stderr:
    """The lines a child writes to stderr, read as they come; ``wait_for`` a line by content."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self.lines: list[str] = []

    async def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while line := await self._stream.readline():
                self.lines.append(line.decode())
                if found := re.search(pattern, self.lines[-1]):
                    return found
        raise AssertionError(f"the balancer exited without logging {pattern!r}: {self.lines}")


@contextlib.asynccontextmanager
async def balancer_with_keys_file(keys_file: Path) -> AsyncIterator[tuple[Stderr, str, int]]:
    """The balancer as a child process; yields its stderr, its proxy URL and its pid."""
    process = await paddler_process(
        "balancer", "--management-port=0", "--reverseproxy-port=0", f"--api-keys-file={keys_file}"
    )
    try:
        stderr = Stderr(process)
        found = await stderr.wait_for(r"reverseproxy listening on (http://\S+)")
        yield stderr, found.group(1), process.pid
    finally:
        await stop_process(process)


async def status_with(session: aiohttp.ClientSession, url: str, key: str) -> int:
    # The model list is the balancer's own answer: it shows the key check alone.
    async with session.get(f"{url}/v1/models", headers={"X-Api-Key": key}) as response:
        return response.status


async def test_sighup_rereads_the_keys_file_and_a_bad_file_keeps_the_keys(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """After SIGHUP a new key works and a removed one gets 401; a malformed file on the next
    SIGHUP is logged and changes nothing."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# keys\nalice: sk-alice-1\n")
    async with balancer_with_keys_file(keys_file) as (stderr, url, pid):
        assert await status_with(session, url, "sk-alice-1") == 200
        assert await status_with(session, url, "sk-bob-2") == 401
        keys_file.write_text("bob: sk-bob-2\n")
        os.kill(pid, signal.SIGHUP)
        reread = await stderr.wait_for(r"re-read .*keys.txt")
        assert "added bob; removed alice" in reread.string
        assert await status_with(session, url, "sk-bob-2") == 200
        assert await status_with(session, url, "sk-alice-1") == 401
        keys_file.write_text("bob: sk-bob-2\nnot a key\n")
        os.kill(pid, signal.SIGHUP)
        kept = await stderr.wait_for(r"ERROR .*keeping the 1 API key\(s\)")
        assert "keys.txt line 2" in kept.string
        assert await status_with(session, url, "sk-bob-2") == 200
    assert not any("sk-" in line for line in stderr.lines)
