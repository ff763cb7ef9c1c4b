"""The routing benchmark's settings, built once from the command line and passed to every part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.cache_sizing import CacheSizing
from bench.llamacpp import BackendSpec
from bench.workloads import ChatShape, IndependentShape, MixedShape
from paddler.tiny_model import TinyModelShape

MODEL = TinyModelShape(embedding_length=256, block_count=4, feed_forward_length=768)
"""Big enough that prefill costs real time: about 1500-2500 prompt tokens/s and 110 generated
tokens/s for one sequence on one thread, so a cache hit saves about a second per chat turn."""


@dataclass(frozen=True)
class RoutingConfig:
    seed: int
    workloads: tuple[str, ...]
    rates: dict[str, tuple[float, ...]]
    """Offered loads per workload, requests per second."""
    requests: dict[str, int]
    """Requests per run (one contestant at one offered load), per workload."""
    contestants: tuple[str, ...]
    servers: int
    slots: int
    """Slots per server."""
    context_per_slot: int
    """Room for the longest request of any workload, answer included."""
    threads: int
    sizing: CacheSizing
    """The prompt cache that workload (a) calls for."""
    cache_ram_mib: int
    """Each server's RAM prompt cache: ``sizing``'s, unless overridden."""
    request_timeout: float
    """Seconds a request may take in all, queueing included, before it counts as a timeout."""
    poll_interval: float
    chat: ChatShape
    independent: IndependentShape
    mixed: MixedShape
    output: Path | None
    plot: Path | None
    results_dir: Path
    quick: bool
    keep_logs: bool
    command: str

    @property
    def backends(self) -> BackendSpec:
        return BackendSpec(
            servers=self.servers,
            slots=self.slots,
            context_size=self.slots * self.context_per_slot,
            threads=self.threads,
            shape=MODEL,
            cache_ram_mib=self.cache_ram_mib,
        )

    @property
    def paddler_flags(self) -> tuple[str, ...]:
        """Room and time enough that Paddler queues every request of a run rather than
        refusing one: its buffer must not be what a contestant loses by."""
        return (
            f"--request-buffer-size={max(self.requests.values())}",
            f"--request-buffer-timeout={self.request_timeout:g}s",
        )
