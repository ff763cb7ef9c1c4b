"""``paddler cluster``: the README's first command, as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import openai
import pytest

from tests.support.balancer import wait_until
from tests.support.llamacpp import stop_process, truncated_model
from tests.support.processes import clean_env

BANNER_END = "Press Ctrl-C"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    living.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return living


@dataclass
class RunningCluster:
    process: asyncio.subprocess.Process
    proxy_port: int
    management_port: int
    output: list[str]
    """stdout up to the end of the banner, then whatever ``read_to_end`` read."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def banner(self) -> str:
        text = "".join(self.output)
        return text[text.index("Paddler cluster is ready") :]

    async def read_to_end(self) -> int:
        """Read stdout until the cluster exits; its exit code."""
        assert self.process.stdout is not None
        async with asyncio.timeout(60):
            self.output += (await self.process.stdout.read()).decode().splitlines(keepends=True)
            return await self.process.wait()


@contextlib.asynccontextmanager
async def running_cluster(
    *arguments: str, env: Mapping[str, str] | None = None, stderr: IO[str] | None = None
) -> AsyncIterator[RunningCluster]:
    """``paddler cluster`` on free ports, once it has printed its banner; stopped after."""
    proxy_port, management_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        f"--reverseproxy-port={proxy_port}",
        f"--management-port={management_port}",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        stdin=asyncio.subprocess.DEVNULL,
        env=dict(env) if env is not None else clean_env(),
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(60):
            while line := (await process.stdout.readline()).decode():
                output.append(line)
                if line.startswith(BANNER_END):
                    break
        assert output and output[-1].startswith(BANNER_END), "".join(output)
        yield RunningCluster(process, proxy_port, management_port, output)
    finally:
        await stop_process(process)


async def run_cluster_command(*arguments: str) -> tuple[int, str, str]:
    """Run ``paddler cluster`` to its end; exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=clean_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await stop_process(process)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def cluster() -> AsyncIterator[RunningCluster]:
    async with running_cluster("--servers=2", "--slots=2") as running:
        yield running


async def test_cluster_serves_requests_and_prints_ready_to_paste_examples(
    cluster: RunningCluster,
) -> None:
    """The cluster comes up on defaults, prints its URL and examples, and answers."""
    banner = cluster.banner
    assert cluster.url in banner
    assert "curl -s" in banner
    assert "from openai import OpenAI" in banner
    assert "/dashboard" in banner
    assert "any model name works" in banner
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/health") as response:
            assert await response.json() == {
                "status": "ok",
                "slots_idle": 4,
                "slots_processing": 0,
                "requests_buffered": 0,
            }
        management = banner.split("dashboard:", 1)[1].split()[0]
        async with session.get(management) as response:
            assert response.status == 200
            assert "text/html" in response.headers["Content-Type"]
        async with session.post(
            f"{cluster.url}/v1/chat/completions",
            json={
                "model": "paddler-tiny",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 16,
            },
        ) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] >= 1


def banner_examples(banner: str) -> list[str]:
    """The commands under "Try it", each as the lines a user would paste."""
    section = banner.split("Try it", 1)[1].split("\n", 1)[1].split(BANNER_END, 1)[0]
    blocks = [textwrap.dedent(block).strip() for block in section.split("\n\n")]
    return [block for block in blocks if block]


async def run_in_bash(command: str) -> tuple[int, str, str]:
    """Run ``command`` as pasted into bash, with a PATH that has no virtualenv on it."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_banner_examples_work_when_pasted_into_bash(cluster: RunningCluster) -> None:
    """The curl and openai examples and the dashboard command, copied from the banner, run in a
    shell whose PATH has no virtualenv (the programs are named by full path)."""
    curl, python = banner_examples(cluster.banner)
    assert curl.startswith("curl ")
    code, stdout, stderr = await run_in_bash(curl)
    assert code == 0, stderr
    reply = json.loads(stdout)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1

    assert "from openai import OpenAI" in python
    code, stdout, stderr = await run_in_bash(python)
    assert code == 0, stderr
    assert stdout.strip()

    hint = cluster.banner.split("in this terminal:", 1)[1].split(")", 1)[0].split()
    assert hint[1:3] == ["dashboard", "--management-addr"]
    code, stdout, stderr = await run_in_bash(f"{shlex.quote(hint[0])} dashboard --help")
    assert code == 0, stderr
    assert "--management-addr" in stdout


async def test_the_cluster_prints_each_start_up_step_in_order(tmp_path: Path) -> None:
    """stdout names each step as it comes (the tiny model only when it has to be written), then
    the banner, and on Ctrl-C the balancer's stop before the agents'."""
    env = clean_env(XDG_CACHE_HOME=str(tmp_path))
    expected = [
        "Starting a Paddler cluster: 1 llama.cpp server(s) x 1 slot(s)",
        "writing the tiny model",
        "starting the balancer",
        "starting server-1 (llama.cpp and its agent)",
        "waiting for the agents",
        "waiting for the agents: 1 of 1 ready",
        "Paddler cluster is ready",
        BANNER_END,
        "stopping the balancer",
        "stopping the agents and their llama.cpp servers",
        "Paddler cluster stopped.",
    ]
    for run in ("first", "second"):
        async with running_cluster("--servers=1", "--slots=1", env=env) as running:
            running.process.send_signal(signal.SIGINT)
            assert await running.read_to_end() == 0
        lines = [line.strip() for line in running.output if line.strip()]
        steps = [
            next((index for index, line in enumerate(lines) if line.startswith(step)), None)
            for step in expected
        ]
        if run == "second":  # the model is already written: no such step
            assert steps[1] is None, lines
            del steps[1]
        assert None not in steps, lines
        assert steps == sorted(steps), lines


@pytest.mark.parametrize("flag", ["--reverseproxy-port", "--management-port"])
async def test_a_cluster_refuses_a_port_that_another_program_holds(flag: str) -> None:
    """With a port taken, the cluster says so in one line naming the port and the flag, and
    exits 1 at once: no traceback, no banner, nothing started."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        other = "--management-port" if flag == "--reverseproxy-port" else "--reverseproxy-port"
        code, stdout, stderr = await run_cluster_command(
            f"{flag}={taken}", f"{other}={free_port()}"
        )
    assert code == 1
    assert stdout == ""
    (line,) = stderr.splitlines()
    assert f"port {taken} " in line
    assert flag in line
    assert "another Paddler cluster may be running" in line


async def test_a_second_cluster_on_the_same_ports_refuses_and_the_first_keeps_serving(
    cluster: RunningCluster,
) -> None:
    """A second cluster on a running one's ports prints one line and exits 1, never "ready";
    the first cluster goes on serving."""
    code, stdout, stderr = await run_cluster_command(
        f"--reverseproxy-port={cluster.proxy_port}",
        f"--management-port={cluster.management_port}",
    )
    assert code == 1
    assert stdout == ""
    assert "is ready" not in stderr
    (line,) = stderr.splitlines()
    assert str(cluster.proxy_port) in line
    assert "Traceback" not in stderr
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{cluster.url}/completion", json={"prompt": "Hello", "n_predict": 4}
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["tokens_predicted"] == 4
    assert cluster.process.returncode is None


async def test_a_model_that_is_not_gguf_is_refused_at_once(tmp_path: Path) -> None:
    """``--model`` with a file that is not GGUF is a usage error before anything starts."""
    model = tmp_path / "model.bin"
    model.write_bytes(b"PK\x03\x04 not a model")
    started = time.monotonic()
    code, stdout, stderr = await run_cluster_command(
        f"--model={model}", f"--reverseproxy-port={free_port()}"
    )
    assert code == 2
    assert stdout == ""
    assert "is not a GGUF model file" in stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - started < 15


async def stream_completion(url: str, n_predict: int, first_event: asyncio.Event) -> list[dict]:
    """Every event of one streaming ``/completion``; ``first_event`` is set on the first."""
    events = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/completion",
            json={"prompt": "Hello", "n_predict": n_predict, "ignore_eos": True, "stream": True},
        ) as response,
    ):
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: ") :]))
                first_event.set()
    return events


async def test_ctrl_c_lets_running_requests_finish_before_the_servers_stop(
    slow_model: Path,
) -> None:
    """SIGINT under load: the balancer drains first, so the streams that were running end
    normally with every token; then every process of the cluster is gone."""
    n_predict = 800  # about 1 s on one core: still running when SIGINT comes, done well before
    # the drain timeout (30 s)
    async with running_cluster(
        f"--model={slow_model}", "--servers=1", "--slots=2", "--threads=1"
    ) as running:
        assert "writing the tiny model" not in "".join(running.output)
        children = descendants(running.process.pid)
        started = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(stream_completion(running.url, n_predict, event))
            for event in started
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 30)
        assert not any(stream.done() for stream in streams)
        running.process.send_signal(signal.SIGINT)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert await running.read_to_end() == 0
    for events in results:
        assert not [event for event in events if "error" in event]
        assert events[-1]["stop"] is True
        assert events[-1]["tokens_predicted"] == n_predict
        assert events[-1]["stop_type"] == "limit"
    output = "".join(running.output)
    assert "stopping the balancer (it lets 2 running request(s) finish" in output
    await wait_until(lambda: not alive(children), timeout=10)


async def test_ctrl_c_stops_every_process_of_the_cluster(cluster: RunningCluster) -> None:
    """SIGINT ends the cluster cleanly and leaves no balancer, agent or llama.cpp behind."""
    children = descendants(cluster.process.pid)
    assert len(children) >= 5  # balancer, 2 agents, 2 llama.cpp servers
    cluster.process.send_signal(signal.SIGINT)
    assert await cluster.read_to_end() == 0
    await wait_until(lambda: not alive(children), timeout=10)


async def test_a_killed_cluster_leaves_no_orphans(cluster: RunningCluster) -> None:
    """Even SIGKILL, which the cluster cannot handle, takes every child down with it."""
    children = descendants(cluster.process.pid)
    cluster.process.send_signal(signal.SIGKILL)
    await cluster.process.wait()
    await wait_until(lambda: not alive(children), timeout=15)


async def test_a_child_that_dies_during_start_up_is_named_with_its_reason() -> None:
    """A balancer that exits before it is ready ends the start-up with one line saying which
    child and why, exit code 1 and no banner."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        f"--reverseproxy-port={free_port()}",
        f"--management-port={free_port()}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        # Read by the balancer alone (the cluster has no such flag): it refuses to start.
        env=clean_env(PADDLER_AGENT_STALE_AFTER="soon"),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await stop_process(process)
    assert process.returncode == 1
    assert "is ready" not in stdout.decode()
    last = stderr.decode().splitlines()[-1]
    assert last.startswith("Error: the balancer exited with code 2 during start-up: ")
    assert "'soon' is not a duration" in last
    assert "Traceback" not in stderr.decode()


def command_line(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline") as file:
        return file.read().split("\0")


async def test_a_child_that_dies_after_start_up_stops_the_cluster_and_says_which() -> None:
    """An agent killed while the cluster runs: the cluster names it in one line, stops the
    rest and exits 1."""
    with tempfile.TemporaryFile("w+") as stderr:
        async with running_cluster("--servers=2", "--slots=1", stderr=stderr) as running:
            children = descendants(running.process.pid)
            (agent,) = [pid for pid in children if "--name=server-2" in command_line(pid)]
            os.kill(agent, signal.SIGKILL)
            assert await running.read_to_end() == 1
        stderr.seek(0)
        last = stderr.read().splitlines()[-1]
    assert last == "Error: the agent of server-2 was killed by SIGKILL; the cluster stopped"
    assert "Paddler cluster stopped." in "".join(running.output)
    await wait_until(lambda: not alive(children), timeout=15)


async def test_llamacpp_options_after_a_double_dash_reach_every_server() -> None:
    """paddler cluster -- --embeddings --pooling mean: the OpenAI SDK's embeddings work."""
    async with running_cluster(
        "--servers=1",
        "--slots=1",
        "--model-alias=embedder",
        "--",
        "--embeddings",
        "--pooling",
        "mean",
    ) as running:
        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        result = await client.embeddings.create(model="embedder", input="hello")
        await client.close()
    assert len(result.data[0].embedding) == 64


async def test_a_model_that_never_loads_ends_the_start_up_with_llamacpps_reason(
    tmp_path: Path,
) -> None:
    """A truncated GGUF file passes the quick check but cannot load: the cluster stops after
    its agents gave up, with one line that says what llama.cpp found wrong."""
    truncated = truncated_model(tmp_path)
    code, stdout, stderr = await run_cluster_command(
        f"--reverseproxy-port={free_port()}",
        f"--management-port={free_port()}",
        "--servers=1",
        f"--model={truncated}",
    )
    assert code == 1
    assert "is ready" not in stdout
    last = stderr.splitlines()[-1]
    assert last.startswith("Error: the agent of server-1 exited with code 1 during start-up: ")
    assert "corrupted or incomplete" in last
    assert "Traceback" not in stderr
