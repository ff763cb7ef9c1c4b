"""Does Paddler drop in? Issue 8's reproductions, measured on a real ``paddler cluster``.

Usage: ``./scripts/bench drop-in [--output docs/benchmarks.md] [--keep-logs]`` (or ``python -m
bench.drop_in`` inside the venv). It starts ``paddler cluster`` (two real llama.cpp servers on
the tiny model, four slots each, no ``--embeddings``) on free ports and measures, in order:

1. how long the cluster takes to print its banner (installed already: no pip here);
2. a second cluster on the same ports: its exit code, its one line, how long it took to refuse;
3. a made-up model name (``gpt-4o-mini``) through the official OpenAI SDK;
4. an embeddings storm: ``embeddings.create()`` through the SDK (with its own 2 retries) against
   servers without ``--embeddings``: what the client is told, how many circuits opened, what
   ``/health`` says, and how long the next chats take; with the balancer's CPU time per
   request of the storm, read from ``/proc``;
5. Ctrl-C under load: 8 streams of 3000 tokens, SIGINT one second in: how many streams end
   normally, how many with an error event, how long the cluster takes to exit.

It writes its section of ``docs/benchmarks.md`` between ``<!-- drop-in:begin -->`` and
``<!-- drop-in:end -->``; the "issue" column quotes the figures measured before the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai

from bench.cpu import process_seconds
from bench.environment import hardware
from bench.processes import free_port, spawn, stop
from bench.routing_report import write_section
from bench.runner import run

BEGIN = "<!-- drop-in:begin -->"
END = "<!-- drop-in:end -->"
ROOT = Path(__file__).resolve().parents[1]
STORM_CALLS = 6
STREAMS = 8
STREAM_TOKENS = 3000


@dataclass
class Findings:
    ready_seconds: float = 0.0
    refusal: tuple[int, str, float] = (0, "", 0.0)
    made_up_name: str = ""
    storm_client: str = ""
    storm_requests: int = 0
    storm_balancer_cpu_ms: float = 0.0
    circuits_open: int = 0
    health: str = ""
    next_chat_ms: list[float] = field(default_factory=list)
    streams_complete: int = 0
    streams_with_error: int = 0
    exit_seconds: float = 0.0
    exit_code: int | None = None


async def benchmark(output: Path | None, workdir: Path) -> int:
    load_before = os.getloadavg()[0]
    proxy_port, management_port = free_port(), free_port()
    ports = (f"--reverseproxy-port={proxy_port}", f"--management-port={management_port}")
    found = Findings()
    started = time.monotonic()
    cluster = await spawn(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        "--servers=2",
        "--slots=4",
        *ports,
        log_path=workdir / "cluster.log",
        stdout_pipe=True,
    )
    try:
        assert cluster.stdout is not None
        async with asyncio.timeout(120):
            while not (await cluster.stdout.readline()).startswith(b"Paddler cluster is ready"):
                pass
        found.ready_seconds = time.monotonic() - started
        reading = asyncio.create_task(cluster.stdout.read())  # so that it never blocks on us
        proxy = f"http://127.0.0.1:{proxy_port}"
        management = f"http://127.0.0.1:{management_port}"
        found.refusal = await second_cluster(ports, workdir)
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="none", max_retries=2)
        async with aiohttp.ClientSession() as session:
            found.made_up_name = await made_up_name(client)
            await storm(client, session, proxy, management, found)
            await ctrl_c_under_load(session, proxy, cluster, found)
        await client.close()
        await reading
    finally:
        await stop(cluster, signum=signal.SIGKILL)
    body = section(found, load_before)
    print(body, flush=True)
    if output is not None:
        write_section(output, body, BEGIN, END)
    ok = found.streams_complete == STREAMS and found.circuits_open == 0
    return 0 if ok else 1


async def second_cluster(ports: tuple[str, str], workdir: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    second = await spawn(
        sys.executable,
        "-m",
        "paddler",
        "cluster",
        *ports,
        log_path=workdir / "second-cluster.log",
        stdout_pipe=True,
        stderr_pipe=True,
    )
    stdout, stderr = await asyncio.wait_for(second.communicate(), 60)
    took = time.monotonic() - started
    assert b"is ready" not in stdout, "a second cluster on busy ports said it was ready"
    lines = stderr.decode(errors="replace").strip().splitlines()
    return second.returncode or 0, lines[-1] if lines else "", took


async def made_up_name(client: openai.AsyncOpenAI) -> str:
    try:
        response = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    except openai.APIStatusError as error:
        return f"{error.status_code}"
    return f"{response.status_code}"


async def storm(
    client: openai.AsyncOpenAI,
    session: aiohttp.ClientSession,
    proxy: str,
    management: str,
    found: Findings,
) -> None:
    balancer = balancer_pid(management)
    before = process_seconds(balancer)
    for _ in range(STORM_CALLS):
        try:
            await client.embeddings.create(model="anything", input="hello")
            found.storm_client = "200"
        except openai.APIStatusError as error:
            found.storm_client = f"{error.status_code}: {error.message}"
    found.storm_requests = STORM_CALLS * 3  # the SDK tries each call three times on a 5xx
    found.storm_balancer_cpu_ms = (process_seconds(balancer) - before) * 1000 / found.storm_requests
    async with session.get(f"{management}/api/v1/agents") as response:
        agents = (await response.json())["agents"]
    found.circuits_open = sum(bool(agent["circuit_open"]) for agent in agents)
    async with session.get(f"{proxy}/health") as response:
        found.health = f"{response.status} {(await response.json())['status']}"
    for _ in range(5):
        started = time.monotonic()
        await client.chat.completions.create(
            model="paddler-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        found.next_chat_ms.append((time.monotonic() - started) * 1000)


def balancer_pid(management: str) -> int:
    """The balancer's process: the one that listens on the management port."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        port = management.rsplit(":", 1)[1]
        if b"balancer" in arguments and f"--management-port={port}".encode() in arguments:
            return int(entry.name)
    raise RuntimeError("the cluster's balancer process was not found")


async def ctrl_c_under_load(
    session: aiohttp.ClientSession,
    proxy: str,
    cluster: asyncio.subprocess.Process,
    found: Findings,
) -> None:
    async def one(number: int) -> str:
        body = {
            "prompt": f"story {number}",
            "n_predict": STREAM_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        last: dict[str, object] = {}
        async with session.post(f"{proxy}/completion", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    last = json.loads(line[6:])
                    if "error" in last:
                        return "error"
        return "complete" if last.get("stop") is True else "cut"

    streams = [asyncio.create_task(one(number)) for number in range(STREAMS)]
    await asyncio.sleep(1.0)
    signalled = time.monotonic()
    cluster.send_signal(signal.SIGINT)
    outcomes = await asyncio.gather(*streams, return_exceptions=True)
    found.exit_code = await asyncio.wait_for(cluster.wait(), 60)
    found.exit_seconds = time.monotonic() - signalled
    found.streams_complete = sum(outcome == "complete" for outcome in outcomes)
    found.streams_with_error = STREAMS - found.streams_complete


def section(found: Findings, load_before: float) -> str:
    machine = hardware(load_before)
    code, line, refused_after = found.refusal
    chats = found.next_chat_ms
    return f"""## Does Paddler drop in? (issue 8's reproductions)

`./scripts/bench drop-in`, on {machine.cpus} CPUs ({machine.cpu_model}), {machine.memory_gib:.0f} GiB,
{machine.kernel}, load {machine.load_before:.2f} before the run. A real `paddler cluster`: two
llama.cpp servers (the tiny model, 4 slots each, started without `--embeddings`). The "issue"
column quotes what issue 8 measured before the fix.

| check | issue | now |
|---|---|---|
| cluster ready (installed already) | 25 to 35 s, install included | {found.ready_seconds:.1f} s |
| a second cluster on the same ports | printed "ready" (the first cluster answered) | exit code {code} after {refused_after:.1f} s: `{line}` |
| `gpt-4o-mini` through the OpenAI SDK, one-model fleet | 404 | {found.made_up_name} |
| what `embeddings.create()` tells the client | 502, "every llama.cpp server failed this request" | {found.storm_client} |
| circuits open after {STORM_CALLS} calls ({found.storm_requests} requests with the SDK's retries) | all | {found.circuits_open} |
| `/health` after the storm | 503 `no_usable_agents` | {found.health} |
| the next chats after the storm | 5.4 s in the buffer | median {statistics.median(chats):.0f} ms, slowest {max(chats):.0f} ms (5 chats) |
| balancer CPU per request of the storm (`/proc`) | | {found.storm_balancer_cpu_ms:.2f} ms |
| Ctrl-C with {STREAMS} streams of {STREAM_TOKENS} tokens running | every stream ended in an error | {found.streams_complete} of {STREAMS} completed, {found.streams_with_error} with an error; exit code {found.exit_code} after {found.exit_seconds:.1f} s (the drain) |
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench drop-in", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-output", action="store_true", help="print the section only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    output = None if arguments.no_output else arguments.output
    run(
        lambda workdir, started_at, stamp: benchmark(output, workdir),
        name="drop-in",
        results_dir=ROOT / "bench" / "results",
        keep_logs=arguments.keep_logs,
    )


if __name__ == "__main__":
    main()
