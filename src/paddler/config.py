"""Frozen configuration, built once by the CLI from flags and ``PADDLER_*`` variables.

Nothing below the CLI reads the environment: every service takes one of these in its
constructor.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

ROUTING_POLICIES = ("prefix", "slots")
"""``--routing`` choices; see ``paddler.balancer.routing.policies``."""

EVENT_LOOPS = ("uvloop", "asyncio")

UPSTREAM_CLIENTS = ("httptools", "aiohttp")
"""``--upstream-client`` choices; see ``paddler.balancer.proxy.upstream``."""

PROXY_SERVERS = ("httptools", "aiohttp")
"""``--proxy-server`` choices; see ``paddler.balancer.proxy.proxy_port``."""
"""``--event-loop`` choices, the default first; see ``paddler.cli.event_loop``."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Address:
    scheme: str
    host: str
    port: int

    @functools.cached_property
    def url(self) -> str:
        """Made once: the capacity index and the pick read an agent's URL for every request."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


MAX_WORKERS = 256


MEMORY_STATE = "memory://"
STATE_SCHEMES = ("redis", "rediss", "unix")
"""What ``--state`` takes beside ``memory://``: redis-py's URLs (``unix://`` for a socket)."""


@dataclass(frozen=True)
class BalancerConfig:
    management_host: str = "127.0.0.1"
    management_port: int = 8085
    reverseproxy_host: str = "127.0.0.1"
    reverseproxy_port: int = 8086
    management_token: str | None = None
    management_insecure: bool = False
    management_dashboard_enable: bool = False
    request_buffer_size: int = 20
    request_buffer_timeout: float = 60.0
    rewrite_host_header: bool = False
    agent_header: bool = True
    max_request_body_size: int = 32 * 1024 * 1024
    request_body_memory: int = 512 * 1024 * 1024
    agent_stale_after: float = 5.0
    upstream_connect_timeout: float = 5.0
    upstream_keepalive_timeout: float = 2.0
    upstream_read_timeout: float = 600.0
    upstream_client: str = "httptools"
    """Which HTTP client relays requests to llama.cpp (``--upstream-client``)."""
    proxy_server: str = "httptools"
    """Which HTTP server serves the proxy port (``--proxy-server``)."""
    max_retries: int = 2
    circuit_breaker_cooldown: float = 5.0
    circuit_breaker_failure_threshold: int = 3
    slot_settle_timeout: float = 2.0
    shutdown_drain_timeout: float = 30.0
    max_agents: int = 1024
    statsd_enable: bool = False
    statsd_host: str = "127.0.0.1"
    statsd_port: int = 8125
    statsd_prefix: str = "paddler"
    statsd_interval: float = 1.0
    autoscaling_target_utilization: float = 0.8
    routing: str = "prefix"
    prefix_index_memory: int = 64 * 1024 * 1024
    allow_unknown_models: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Client keys of the proxy port (``--api-key``); see ``paddler.balancer.proxy.api_keys``."""
    api_keys_file: Path | None = None
    llamacpp_api_key: str | None = None
    max_slots_per_agent: int = 256
    reverseproxy_tls_cert: Path | None = None
    reverseproxy_tls_key: Path | None = None
    management_tls_cert: Path | None = None
    management_tls_key: Path | None = None

    client_header_timeout: float = 10.0
    client_body_timeout: float = 30.0
    client_keepalive_timeout: float = 75.0
    max_client_connections: int = 2048
    event_loop: str = "uvloop"
    """Which event loop the process runs on (``--event-loop``); the CLI makes it."""
    workers: int = 1
    """Processes that serve the proxy port (``--workers``); with more than 1, this process
    holds the fleet and serves them (``paddler.balancer.fleet.fleet_host``)."""
    state: str = "memory://"
    """Where the fleet's state lives (``--state``): in this process, or a Redis URL shared by
    several balancers (docs/ha.md)."""
    lease_timeout: float = 10.0
    """With a shared state: how long a reservation outlives the balancer that made it."""

    @property
    def shared_state(self) -> bool:
        return self.state != MEMORY_STATE

    @property
    def reverseproxy_scheme(self) -> str:
        return "https" if self.reverseproxy_tls_cert is not None else "http"

    @property
    def management_scheme(self) -> str:
        return "https" if self.management_tls_cert is not None else "http"

    def validate(self) -> None:
        """Refuse configurations that would be unsafe or meaningless."""
        for port in ("reverseproxy", "management"):
            cert = getattr(self, f"{port}_tls_cert")
            key = getattr(self, f"{port}_tls_key")
            if (cert is None) != (key is None):
                raise ValueError(
                    f"--{port}-tls-cert and --{port}-tls-key go together: give both or neither"
                )
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise ValueError("--api-key: an API key must be non-empty and contain no whitespace")
        if (
            not self.management_token
            and not self.management_insecure
            and not is_loopback(self.management_host)
        ):
            raise ValueError(
                f"the management address {self.management_host} is not loopback: anyone who "
                "reaches it could register a backend. Set --management-token "
                "(PADDLER_MANAGEMENT_TOKEN), or pass --management-insecure to accept that."
            )
        scheme = self.state.partition("://")[0]
        if self.state != MEMORY_STATE and scheme not in STATE_SCHEMES:
            raise ValueError(
                f"--state must be {MEMORY_STATE} or a Redis URL "
                f"({', '.join(f'{name}://' for name in STATE_SCHEMES)}), not {self.state!r}"
            )
        if self.shared_state and self.workers > 1:
            raise ValueError(
                "--workers and a shared --state do not go together yet: run one balancer per "
                "core on the shared state instead"
            )
        if self.lease_timeout <= 0:
            raise ValueError("--lease-timeout must be positive")
        if self.request_buffer_size < 0:
            raise ValueError("--request-buffer-size must be 0 or more")
        if self.request_buffer_timeout <= 0:
            raise ValueError("--request-buffer-timeout must be positive")
        if self.upstream_read_timeout <= 0:
            raise ValueError("--upstream-read-timeout must be positive")
        if not 0 < self.autoscaling_target_utilization <= 1:
            raise ValueError("--autoscaling-target-utilization must be above 0 and at most 1")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"--routing must be one of {', '.join(ROUTING_POLICIES)}")
        if self.prefix_index_memory < 0:
            raise ValueError("--prefix-index-memory must be 0 or more")
        if self.max_slots_per_agent < 1:
            raise ValueError("--max-slots-per-agent must be 1 or more")
        for name in ("client_header_timeout", "client_body_timeout", "client_keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.max_client_connections < 1:
            raise ValueError("--max-client-connections must be 1 or more")
        if self.upstream_client not in UPSTREAM_CLIENTS:
            raise ValueError(f"--upstream-client must be one of {', '.join(UPSTREAM_CLIENTS)}")
        if self.proxy_server not in PROXY_SERVERS:
            raise ValueError(f"--proxy-server must be one of {', '.join(PROXY_SERVERS)}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}")
        if any(character in self.statsd_prefix for character in ":|@# \t\n"):
            raise ValueError("--statsd-prefix may not contain ':', '|', '@', '#' or whitespace")


@dataclass(frozen=True)
class LlamaCppLaunch:
    """How an agent runs llama.cpp itself (``paddler agent --model``)."""

    model: Path
    slots: int = 4
    context_size: int = 0  # 0: 4096 tokens per slot
    threads: int = 0  # 0: let llama.cpp choose
    alias: str | None = None
    cache_ram_mib: int = 1024
    restart_backoff_max: float = 30.0
    # llama-server's own options, passed through: see paddler.agent.llamacpp_options
    extra_args: tuple[str, ...] = ()

    @property
    def total_context(self) -> int:
        return self.context_size or 4096 * self.slots


@dataclass(frozen=True)
class AgentConfig:
    local: Address
    external: Address
    management_host: str = "127.0.0.1"
    management_port: int = 8085
    management_addresses: tuple[tuple[str, int], ...] = ()
    """Balancers to link to, one at a time, in this order (``--management-addr``, repeatable);
    empty: ``management_host`` and ``management_port`` alone."""
    management_scheme: str = "http"
    """``https``: the agent speaks TLS to the balancer's management port (wss://)."""
    management_token: str | None = None
    management_ca_file: Path | None = None
    """With ``https``: the CA that signed the balancer's certificate (None: the system's store)."""
    local_llamacpp_api_key: str | None = None
    name: str = ""
    reporting_interval: float = 1.0
    monitoring_interval: float = 0.25
    llamacpp_timeout: float = 3.0
    reconnect_backoff_max: float = 10.0
    shutdown_drain_timeout: float = 30.0
    """On shutdown, how long requests running on our own llama.cpp may take to finish."""
    launch: LlamaCppLaunch | None = None
    event_loop: str = "uvloop"
    """Which event loop the process runs on (``--event-loop``); the CLI makes it."""

    @property
    def balancers(self) -> tuple[tuple[str, int], ...]:
        """The management addresses to link to, in order of preference."""
        return self.management_addresses or ((self.management_host, self.management_port),)

    @property
    def management_url(self) -> str:
        return Address(self.management_scheme, self.management_host, self.management_port).url


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a host and a port; ValueError if malformed."""
    host, separator, port_text = text.strip().rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT, such as 127.0.0.1:8085")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a port between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
