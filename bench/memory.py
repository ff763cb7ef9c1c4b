"""Resident memory of a process (and of its children), read from ``/proc`` (Linux; 0 elsewhere).

RSS is what the kernel holds in RAM for the process: what an operator's memory limit counts. For
nginx the master and its worker are summed; for Paddler the balancer and its traits worker.
"""

from __future__ import annotations

from pathlib import Path

from bench.cpu import process_tree


def rss_bytes(pid: int) -> int:
    """The resident set of ``pid`` alone, in bytes."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(pid: int) -> int:
    """The resident sets of ``pid`` and of its running descendants, summed."""
    return sum(rss_bytes(member) for member in process_tree(pid))
