"""``paddler cluster``: a whole fleet on this machine, as separate processes.

One balancer and N agents, each agent running its own llama.cpp server (``paddler agent
--model``), exactly as they would run on separate machines. The agents authenticate with a token
generated for this cluster. Ctrl-C (or SIGTERM) stops the agents first, so that they deregister,
then the balancer. Each child also dies with this process (PR_SET_PDEATHSIG on Linux), so even a
SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

_READY_TIMEOUT = 180.0
_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class ClusterConfig:
    model: Path | None = None
    servers: int = 2
    slots: int = 4
    threads: int = 1
    context_size: int = 0
    model_alias: str | None = None
    extra_args: tuple[str, ...] = ()
    """llama-server options for every server, checked by the CLI."""
    reverseproxy_port: int = 8086
    management_port: int = 8085
    request_buffer_size: int = 20
    request_buffer_timeout: float = 60.0
    routing: str = "prefix"
    allow_unknown_models: bool = False
    shutdown_drain_timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "text"


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux to SIGTERM it when we die."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self._config = config
        self._children: list[tuple[str, asyncio.subprocess.Process]] = []

    async def run_until_signalled(self) -> int:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, shutdown.set)
        try:
            return await self.run(shutdown)
        finally:
            await self._stop_all()

    async def run(self, shutdown: asyncio.Event) -> int:
        config = self._config
        if config.model is not None:
            model = config.model
        else:
            from paddler.tiny_model import ensure_tiny_model

            model = await asyncio.to_thread(ensure_tiny_model)
        proxy_port = config.reverseproxy_port or _free_port()
        management_port = config.management_port or _free_port()
        env = {
            **os.environ,
            "PADDLER_MANAGEMENT_TOKEN": secrets.token_urlsafe(24),
            "PADDLER_LOG_LEVEL": config.log_level,
            "PADDLER_LOG_FORMAT": config.log_format,
        }
        await self._spawn(
            "balancer",
            [
                "balancer",
                f"--management-port={management_port}",
                f"--reverseproxy-port={proxy_port}",
                f"--request-buffer-size={config.request_buffer_size}",
                f"--request-buffer-timeout={config.request_buffer_timeout}",
                f"--routing={config.routing}",
                f"--allow-unknown-models={config.allow_unknown_models}",
                f"--shutdown-drain-timeout={config.shutdown_drain_timeout}",
                "--management-dashboard-enable",  # loopback only, and read-only
            ],
            env,
        )
        management = f"http://127.0.0.1:{management_port}"
        async with aiohttp.ClientSession() as session:
            await self._wait_for(session, f"{management}/health", lambda _: True, shutdown)
            for index in range(1, config.servers + 1):
                await self._spawn(
                    f"agent-{index}",
                    [
                        "agent",
                        f"--name=server-{index}",
                        f"--model={model}",
                        f"--slots={config.slots}",
                        f"--threads={config.threads}",
                        "--local-llamacpp-port=0",
                        f"--management-port={management_port}",
                        f"--model-alias={config.model_alias or _alias(config.model)}",
                        f"--context-size={config.context_size}",
                        *(["--", *config.extra_args] if config.extra_args else []),
                    ],
                    env,
                )
            expected = config.servers
            ready = await self._wait_for(
                session,
                f"{management}/api/v1/agents",
                lambda body: sum(a["state"] == "ok" for a in body["agents"]) >= expected,
                shutdown,
            )
        if not ready:
            return 0 if shutdown.is_set() else 1
        self._print_banner(proxy_port, management_port, model)
        return await self._supervise(shutdown)

    async def _spawn(self, role: str, arguments: list[str], env: dict[str, str]) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "paddler",
            *[argument for argument in arguments if argument],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us alone; we stop children in order
            preexec_fn=_die_with_parent,
        )
        self._children.append((role, process))
        log.info("started %s (pid %d)", role, process.pid)

    async def _wait_for(
        self,
        session: aiohttp.ClientSession,
        url: str,
        condition: Callable[[Any], bool],
        shutdown: asyncio.Event,
    ) -> bool:
        """Poll ``url`` until ``condition(json)`` holds; False if a child died or we stopped."""
        deadline = asyncio.get_running_loop().time() + _READY_TIMEOUT
        while not shutdown.is_set() and asyncio.get_running_loop().time() < deadline:
            if self._dead_child() is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, json.JSONDecodeError):
                async with session.get(url) as response:
                    if response.status == 200 and condition(await response.json()):
                        return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shutdown.wait(), 0.2)
        if not shutdown.is_set():
            log.error("the cluster did not become ready: %s", url)
        return False

    def _dead_child(self) -> str | None:
        for role, process in self._children:
            if process.returncode is not None:
                log.error("%s exited with code %s", role, process.returncode)
                return role
        return None

    async def _supervise(self, shutdown: asyncio.Event) -> int:
        waits = [asyncio.ensure_future(process.wait()) for _, process in self._children]
        stop = asyncio.ensure_future(shutdown.wait())
        try:
            await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stop, *waits]:
                task.cancel()
        if shutdown.is_set():
            return 0
        self._dead_child()
        return 1

    async def _stop_all(self) -> None:
        """Stop agents first (they deregister), then the balancer; kill what lingers."""
        for role, process in reversed(self._children):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", role, _STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._children.clear()

    def _print_banner(self, proxy_port: int, management_port: int, model: Path) -> None:
        config = self._config
        url = f"http://127.0.0.1:{proxy_port}"
        alias = _alias(config.model)
        print(
            f"""
Paddler cluster is ready: {config.servers} llama.cpp server(s) x {config.slots} slot(s), model {model}

  proxy (OpenAI / llama.cpp API): {url}
  dashboard:                      http://127.0.0.1:{management_port}/dashboard
                                  (or in this terminal: paddler dashboard --management-addr 127.0.0.1:{management_port})
  fleet status:                   http://127.0.0.1:{management_port}/api/v1/agents
  Prometheus metrics:             http://127.0.0.1:{management_port}/metrics
  aggregate health:               {url}/health

Try it:

  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{alias}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); \\
print(c.chat.completions.create(model="{alias}", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=16).choices[0].message.content)'

Press Ctrl-C to stop everything.
""",
            flush=True,
        )


def _alias(model: Path | None) -> str:
    """The model name clients send: the file's stem for a given model (the balancer answers
    404 to names no server serves)."""
    return "paddler-tiny" if model is None else model.stem
