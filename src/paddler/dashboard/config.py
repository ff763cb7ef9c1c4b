"""The dashboard's settings, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DashboardConfig:
    management_host: str = "127.0.0.1"
    management_port: int = 8085
    refresh_interval: float = 1.0
    management_scheme: str = "http"
    management_ca_file: Path | None = None
    """With ``https``: the CA of the balancer's certificate (None: the system's store)."""

    @property
    def management_addr(self) -> str:
        host = self.management_host
        return (
            f"[{host}]:{self.management_port}" if ":" in host else f"{host}:{self.management_port}"
        )

    @property
    def management_url(self) -> str:
        return f"{self.management_scheme}://{self.management_addr}"

    @property
    def request_timeout(self) -> float:
        """How long one request may take before the balancer counts as unreachable."""
        return max(2.0, 2 * self.refresh_interval)
