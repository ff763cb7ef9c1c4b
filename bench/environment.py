"""What the numbers were measured on: the machine and the versions of everything in the path."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hardware:
    cpus: int
    """CPUs this process may run on, as ``nproc`` counts them."""
    cpu_model: str
    memory_gib: float
    kernel: str
    load_before: float
    """The 1-minute load average when the benchmark started: other work on the machine skews it."""


@dataclass(frozen=True)
class Versions:
    llamacpp_build: str
    xllamacpp: str
    nginx: str
    paddler: str
    aiohttp: str
    python: str


def hardware(load_before: float) -> Hardware:
    return Hardware(
        cpus=len(os.sched_getaffinity(0)),
        cpu_model=_cpu_model(),
        memory_gib=_memory_gib(),
        kernel=f"{platform.system()} {platform.release()}",
        load_before=load_before,
    )


def versions(props: dict[str, Any], nginx: str) -> Versions:
    return Versions(
        llamacpp_build=str(props.get("build_info") or "unknown"),
        xllamacpp=_version("xllamacpp"),
        nginx=nginx,
        paddler=_version("paddler"),
        aiohttp=_version("aiohttp"),
        python=platform.python_version(),
    )


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")
