"""CPU time that each party spends: the client, the proxy and llama.cpp, and everyone else.

On a machine with few cores every party competes for the same CPUs, so what a proxy costs shows
up twice: as latency in its own hop and as CPU taken from the server beside it. CPU seconds per
request make the second part visible. The machine's busy time minus that of the benchmark's own
processes tells whether anything else ran meanwhile and skewed a run. Read from ``/proc``
(Linux); elsewhere they read as 0.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and of its children that are still running."""
    return sum(_own_seconds(member) for member in _tree(pid))


def own_and_tree_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid`` alone, and of it with its running children."""
    own = _own_seconds(pid)
    return own, own + sum(_own_seconds(member) for member in _tree(pid)[1:])


def client_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_seconds() -> tuple[float, float]:
    """CPU seconds since boot, all CPUs together: spent on work here, and stolen.

    Stolen time is time the hypervisor gave to other virtual machines while this one had work:
    it is not work done here, but it slows every party down.
    """
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0, 0.0
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


@dataclass(frozen=True)
class CpuUse:
    parties: dict[str, float]
    """CPU seconds of each party, and ``client`` for this process."""
    other: float
    """CPU seconds of everything outside this process and its children."""
    stolen: float
    """CPU seconds the hypervisor gave to other machines."""


@dataclass(frozen=True)
class CpuParties:
    """Whose CPU time to count, by name: the process ids of each party."""

    parties: Mapping[str, tuple[int, ...]]

    def snapshot(self) -> dict[str, float]:
        seconds = {name: _sum(pids) for name, pids in self.parties.items()}
        seconds["client"] = client_seconds()
        seconds[_OURS] = process_seconds(os.getpid())
        seconds[_MACHINE], seconds[_STOLEN] = machine_seconds()
        return seconds

    @staticmethod
    def used(before: Mapping[str, float], after: Mapping[str, float]) -> CpuUse:
        spent = {name: after[name] - before[name] for name in after}
        machine, ours, stolen = spent.pop(_MACHINE), spent.pop(_OURS), spent.pop(_STOLEN)
        return CpuUse(parties=spent, other=max(0.0, machine - ours), stolen=stolen)


_OURS = "_ours"
_MACHINE = "_machine"
_STOLEN = "_stolen"


def _sum(pids: Iterable[int]) -> float:
    return sum(process_seconds(pid) for pid in pids)


def _own_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses; the fields start after the last ")".
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _tree(pid: int) -> list[int]:
    found = [pid]
    for member in found:
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                found += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its running descendants (for memory as well as CPU)."""
    return _tree(pid)
