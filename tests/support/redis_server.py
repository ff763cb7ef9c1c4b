"""A real Redis server for tests: Debian's ``redis-server``, on a Unix socket of its own.

``./scripts/test`` installs it when it is missing; a test that needs it fails (it is not
skipped) when it is not there. Nothing is saved to disk, so a restart starts empty, as a Redis
without persistence does after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

_READY_TIMEOUT = 10.0


class RedisServer:
    """One ``redis-server`` process; ``url`` stays the same across ``restart``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._directory),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = Redis.from_url(self.url)
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                while True:
                    if self._process.returncode is not None:
                        raise RuntimeError(f"redis-server exited with {self._process.returncode}")
                    with contextlib.suppress(OSError, RedisConnectionError):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.kill()  # as a crash: nothing is saved, nothing is said to the clients
        await process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@contextlib.asynccontextmanager
async def running_redis() -> AsyncIterator[RedisServer]:
    """A fresh Redis until the block ends (its socket in a short path: a Unix socket's path
    may not be longer than 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="paddler-redis-"))
    server = RedisServer(directory)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)
