"""nginx as a plain streaming reverse proxy: the reference for what any proxy hop costs.

The configuration mirrors what Paddler does on its data path and nothing more: HTTP/1.1 with
keep-alive to llama.cpp, responses relayed as they arrive (``proxy_buffering off``), one worker
process (Paddler's balancer is one process with one event loop too).

llama.cpp closes an idle keep-alive connection after 5 s, and closes the connection after every
streamed answer. nginx finds out that a pooled connection is dead only when it reuses it, and by
default it never sends a POST again (``proxy_next_upstream`` leaves non-idempotent requests
alone): the client would get a 502. The configuration lets it resend on a new connection, which
is what Paddler's upstream does too, and forgets idle connections after 4 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.llamacpp import Backend
from bench.processes import free_port, log_tail, spawn, stop

_CONFIG = """\
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;

    upstream llamacpp {{
{balance}{servers}
        keepalive 256;
        keepalive_timeout 4s;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llamacpp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            # llama.cpp closes the connection after every streamed answer, so a pooled one may
            # be dead on reuse; without non_idempotent nginx answers such a POST with 502
            # instead of sending it again on a new connection (as Paddler does).
            proxy_next_upstream error timeout non_idempotent;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed (./scripts/bench installs it)")
    return found


def render_config(
    backends: list[Backend], port: int, workdir: Path, balance: str = "least_conn"
) -> str:
    """``balance`` is the upstream's method directive; "" is nginx's default, round robin."""
    # max_fails=0: a pooled connection that llama.cpp has closed is not the server's failure;
    # counting it would take every server out of rotation in turn (502 "no live upstreams").
    servers = "\n".join(
        f"        server {backend.url.split('//', 1)[1]} max_fails=0;" for backend in backends
    )
    method = f"        {balance};\n" if balance else ""
    return _CONFIG.format(workdir=workdir, balance=method, servers=servers, port=port)


async def nginx_version() -> str:
    process = await asyncio.create_subprocess_exec(
        nginx_binary(), "-v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return output.decode().strip().removeprefix("nginx version: ")


@dataclass(frozen=True)
class RunningNginx:
    url: str
    pid: int
    """The master's; its worker is its child."""


@contextlib.asynccontextmanager
async def running_nginx(
    backends: list[Backend], workdir: Path, balance: str = "least_conn"
) -> AsyncIterator[RunningNginx]:
    """Run nginx in front of ``backends`` until the block ends (``balance``: see
    ``render_config``)."""
    directory = workdir / "nginx"
    directory.mkdir()
    # Workers run as "nobody" when nginx starts as root; they must reach their temp paths.
    directory.chmod(0o755)
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(render_config(backends, port, directory, balance))
    log_path = directory / "nginx-stderr.log"
    process = await spawn(
        nginx_binary(),
        "-p",
        str(directory),
        "-c",
        str(config),
        "-e",
        str(directory / "nginx-error.log"),
        "-g",
        "daemon off;",
        log_path=log_path,
        own_group=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_healthy(url, process, directory)
        yield RunningNginx(url, process.pid)
    finally:
        # SIGTERM is nginx's fast shutdown: the master stops its workers, then exits.
        await stop(process, signum=signal.SIGTERM, own_group=True)


async def _wait_healthy(url: str, process: asyncio.subprocess.Process, directory: Path) -> None:
    """Poll llama.cpp's /health through nginx until it answers 200."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(20.0):
        while process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(
        f"nginx exited with code {process.returncode}:\n"
        f"{log_tail(directory / 'nginx-stderr.log')}\n{log_tail(directory / 'nginx-error.log')}"
    )
