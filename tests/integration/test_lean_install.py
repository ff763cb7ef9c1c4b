"""The balancer host needs neither llama.cpp nor a terminal UI library (nor numpy).

``pip install paddler`` installs the balancer and the agent for an external llama.cpp; the
llama.cpp runtime, the model generator and the terminal dashboard are extras. These tests run
the commands in a Python that cannot import any of those, and read the package's metadata.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket
import sys
from pathlib import Path

import aiohttp

from tests.support.llamacpp import stop_process
from tests.support.processes import clean_env

OPTIONAL = ("xllamacpp", "textual", "gguf", "numpy", "openai")

# Runs `paddler ...` in a Python where the optional packages cannot be imported.
WITHOUT_EXTRAS = f"""
import sys
from importlib.abc import MetaPathFinder

class Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Missing())
from paddler.cli import main
sys.argv = ["paddler", *sys.argv[1:]]
main()
"""


def run_without_extras(*arguments: str) -> list[str]:
    return [sys.executable, "-c", WITHOUT_EXTRAS, *arguments]


def test_the_base_install_requires_no_llamacpp_tui_or_numpy() -> None:
    """The optional packages appear only under extras in the package's metadata."""
    requirements = importlib.metadata.requires("paddler") or []
    base = [line for line in requirements if "extra ==" not in line]
    for package in OPTIONAL:
        assert not any(line.startswith(package) for line in base), (package, base)
    extras = importlib.metadata.metadata("paddler").get_all("Provides-Extra") or []
    assert {"llamacpp", "model", "tui", "cluster", "test"} <= set(extras)


async def test_the_balancer_runs_and_proxies_without_the_extras(tmp_path: Path) -> None:
    """Started without llama.cpp, textual, gguf or numpy, it listens and answers."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        notifications.bind(str(path))
        notifications.setblocking(False)
        process = await asyncio.create_subprocess_exec(
            *run_without_extras("balancer", "--management-port=0", "--reverseproxy-port=0"),
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(NOTIFY_SOCKET=str(path)),
        )
        try:
            loop = asyncio.get_running_loop()
            ready = await asyncio.wait_for(loop.sock_recv(notifications, 4096), 30)
            status = ready.decode().split("STATUS=", 1)[1]
            proxy_port = int(status.split("proxy on port ")[1].split(",")[0])
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{proxy_port}/v1/models") as response,
            ):
                assert response.status == 200
                assert await response.json() == {"object": "list", "data": []}
        finally:
            await stop_process(process)
        assert process.stderr is not None
        assert b"Traceback" not in await process.stderr.read()


async def test_commands_that_need_an_extra_say_which_to_install(tmp_path: Path) -> None:
    """The terminal dashboard and a llama.cpp of the agent's own name the pip extra."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    for arguments, extra in (
        (("dashboard",), "paddler[tui]"),
        (("agent", "--model", str(model)), "paddler[llamacpp]"),
        (("cluster",), "paddler[llamacpp]"),
    ):
        process = await asyncio.create_subprocess_exec(
            *run_without_extras(*arguments),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(),
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1, output
        assert extra in output.decode()
        assert b"Traceback" not in output
