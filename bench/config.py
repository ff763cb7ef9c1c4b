"""The benchmark's settings, built once from the command line and passed to every part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.llamacpp import BackendSpec

CONTEXT_PER_SLOT = 512
"""Tokens of context per slot: a prompt of about 40 tokens plus ``n_predict`` fit many times."""


@dataclass(frozen=True)
class BenchConfig:
    concurrency: tuple[int, ...]
    requests: int
    """Measured requests per cell (one contestant at one concurrency), over all rounds."""
    rounds: int
    """Each cell is measured in this many rounds; the contestants take turns within a round."""
    n_predict: int
    servers: int
    slots: int
    """Slots per llama.cpp server."""
    threads: int
    """llama.cpp CPU threads per server."""
    poll_interval: float
    output: Path | None
    results_dir: Path
    quick: bool
    keep_logs: bool
    disturbance_limit: float
    """A run during which other processes on this machine took more CPUs than this on average
    is measured again. (Time stolen by the hypervisor is only reported: it is not ours to wait
    out, and the rounds spread it over the contestants.)"""
    disturbed_retries: int
    """How often a disturbed run is repeated at most; the last attempt counts whatever it saw."""
    command: str

    def requests_in_round(self, round_index: int) -> int:
        """Split ``requests`` over the rounds; the first rounds take the remainder."""
        share, remainder = divmod(self.requests, self.rounds)
        return share + (1 if round_index < remainder else 0)

    def warmup_requests(self, concurrency: int) -> int:
        """Unmeasured requests at the start of each run: every connection opens, and the
        streams fall out of step with each other, as they are under steady load."""
        return max(2 * concurrency, 8)

    def cooldown_requests(self, concurrency: int) -> int:
        """Unmeasured requests at the end of each run, so that every stream stays busy until
        the last measured request has ended."""
        return concurrency

    @property
    def context_size(self) -> int:
        return self.slots * CONTEXT_PER_SLOT

    @property
    def backends(self) -> BackendSpec:
        """The tiny default model, so that generation is fast and a proxy's cost shows."""
        return BackendSpec(
            servers=self.servers,
            slots=self.slots,
            context_size=self.context_size,
            threads=self.threads,
        )
