"""The settings of a local cluster, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClusterConfig:
    model: Path | None = None
    """The GGUF file every server loads; None: the tiny model, written on first use."""
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
    prefix_index_memory: int = 64 * 1024 * 1024
    allow_unknown_models: bool = False
    shutdown_drain_timeout: float = 30.0
    """On stop, how long the balancer lets running requests finish before the servers stop."""
    log_level: str = "info"
    log_format: str = "text"
    event_loop: str = "uvloop"
    """The cluster's own event loop, and that of the balancer and agents it starts."""

    @property
    def alias(self) -> str:
        """The model name the servers report and the banner's examples send."""
        if self.model_alias:
            return self.model_alias
        return "paddler-tiny" if self.model is None else self.model.stem
