"""Real llama.cpp servers for tests, each in a process of its own and never left behind.

``running_llamacpp`` starts ``python -m paddler.agent.llamacpp_child`` with the tiny model, waits
for its ready line (never for a sleep), and on exit stops it: SIGTERM, then SIGKILL. The child
also exits by itself if the test process dies, because its stdin reaches end of file.
llama.cpp's log goes to the test's stderr, which pytest shows for failing tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from paddler.agent.llamacpp_child import API_KEY_ENV, READY_PREFIX
from paddler.tiny_model import ensure_tiny_model


def tiny_model_path() -> Path:
    """The default tiny model, generated once into the user's cache and reused after that."""
    return ensure_tiny_model()


@dataclass(frozen=True)
class LlamaCppServer:
    url: str
    port: int
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.asynccontextmanager
async def running_llamacpp(
    model: Path | None = None,
    *,
    slots: int = 2,
    ctx: int = 0,
    threads: int = 1,
    port: int = 0,
    alias: str | None = None,
    api_key: str | None = None,
    slots_endpoint: bool = True,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> AsyncIterator[LlamaCppServer]:
    """Run one real llama.cpp on 127.0.0.1 (``port`` 0: a free port) until the block ends.

    ``ctx`` is the total context shared by the slots; 0 gives each slot 2048 tokens.
    ``extra_args`` are llama-server's own options, such as ``("--embeddings",)``.
    """
    argv = [
        sys.executable,
        "-m",
        "paddler.agent.llamacpp_child",
        "--model",
        str(model or tiny_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--ctx",
        str(ctx or 2048 * slots),
        "--threads",
        str(threads),
        "--cache-ram-mib",
        "0",
        "--parent-pid",
        str(os.getpid()),
    ]
    if alias:
        argv += ["--alias", alias]
    if not slots_endpoint:
        argv.append("--no-slots")
    if extra_args:
        argv += ["--", *extra_args]
    env = {name: value for name, value in os.environ.items() if name != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        url = await _read_ready_line(process, ready_timeout)
        yield LlamaCppServer(url=url, port=int(url.rsplit(":", 1)[1]), process=process)
    finally:
        await stop_process(process)


async def _read_ready_line(process: asyncio.subprocess.Process, timeout: float) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while line := await process.stdout.readline():
            text = line.decode().strip()
            if text.startswith(f"{READY_PREFIX} "):
                return text.removeprefix(f"{READY_PREFIX} ")
        code = await process.wait()
    raise RuntimeError(f"llama.cpp exited with code {code} before it was ready (see stderr)")


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 5.0) -> None:
    """Stop a child for good: close its stdin, SIGTERM, then SIGKILL; reap it in every case."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await process.wait()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def process_exists(pid: int) -> bool:
    """True while ``pid`` names a process (a zombie counts: it has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def truncated_model(directory: Path) -> Path:
    """The tiny model cut short: a GGUF header that llama.cpp accepts, then too few bytes, as a
    download that broke off leaves it. llama.cpp refuses to load it, every time."""
    truncated = directory / "truncated.gguf"
    truncated.write_bytes(tiny_model_path().read_bytes()[:200_000])
    return truncated
