"""The fleet's Prometheus gauges, rendered from fleet readings (see ``fleet_view``).

Six gauges describe the fleet as a whole, and six each agent (labels ``agent``, ``model``,
``url``); ``docs/observability.md`` lists them. The per-agent lines are rendered here by hand,
once per reading, in slices, and shared by every scrape of that reading in either format: the
Prometheus text format and OpenMetrics write a gauge sample the same way. prometheus_client
builds a ``Sample`` tuple per series and formats each through generic code: at 1,000 agents
(6,000 series) that took about 40 ms in one piece on the event loop, where this takes about
1.5 ms, spread over slices. The ``# HELP`` and ``# TYPE`` lines, and the fleet-wide gauges, are
still written by prometheus_client, for whichever format the scraper asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paddler.balancer.fleet.fleet_view import FleetReading, FleetView, PerReading
from paddler.balancer.fleet.request_buffer import RequestBuffer

Encoder = Callable[[Collector], bytes]

AGENT_LABELS = ("agent", "model", "url")
AGENT_GAUGES = (
    ("paddler_agent_slots", "llama.cpp slots of one agent."),
    ("paddler_agent_slots_idle", "Free slots of one agent."),
    (
        "paddler_agent_slots_processing",
        "Busy slots of one agent (reserved by the balancer, or used by other traffic).",
    ),
    (
        "paddler_agent_usable",
        "1 if the agent can take requests (verified, llama.cpp ok, circuit closed), else 0.",
    ),
    (
        "paddler_agent_prefill_tokens_per_second",
        "Measured prompt tokens one agent's llama.cpp computes per second (running average).",
    ),
    (
        "paddler_agent_slot_hold_seconds",
        "Measured time a request holds one of the agent's slots (running average).",
    ),
)
_EOF = b"# EOF\n"
_HEADER_FORMATS = 8
"""Formats whose header lines are kept: a scraper names the version, so there could be many."""


class Families(Collector):
    """A fixed list of metric families, for prometheus_client's encoders."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class FleetGauges:
    def __init__(self, view: FleetView, buffer: RequestBuffer) -> None:
        self._buffer = buffer
        self._view = view
        self._per_agent = PerReading(view, self._render)
        self._headers: dict[str, list[bytes]] = {}

    async def exposition(
        self, encoder: Encoder, content_type: str, names: Collection[str] | None = None
    ) -> bytes:
        """The fleet's families in ``encoder``'s format, without OpenMetrics' ``# EOF``; with
        ``names``, only the families named there (Prometheus' ``name[]``)."""
        reading, blocks = await self._per_agent.get()
        parts = [_without_eof(encoder(Families(self._totals(reading, names))))]
        headers = self._header_lines(encoder, content_type)
        for (name, _), header, block in zip(AGENT_GAUGES, headers, blocks, strict=True):
            if names is None or name in names:
                parts += (header, block)
        return b"".join(parts)

    def _totals(self, reading: FleetReading, names: Collection[str] | None) -> list[Metric]:
        totals = [
            (
                "paddler_agents",
                "Agents registered with the balancer, in any state.",
                len(reading.agents),
            ),
            (
                "paddler_agents_usable",
                "Agents that can take requests: verified, llama.cpp ok and the circuit closed.",
                reading.usable_agents,
            ),
            ("paddler_slots", "llama.cpp slots on usable agents.", reading.slots_total),
            ("paddler_slots_idle", "Free slots on usable agents.", reading.slots_idle),
            ("paddler_slots_processing", "Busy slots on usable agents.", reading.slots_processing),
            (
                "paddler_requests_buffered",
                "Requests waiting in the balancer's buffer for a free slot.",
                self._buffer.waiting,
            ),
        ]
        return [
            GaugeMetricFamily(name, documentation, value=value)
            for name, documentation, value in totals
            if names is None or name in names
        ]

    def _header_lines(self, encoder: Encoder, content_type: str) -> list[bytes]:
        """Each per-agent family's ``# HELP`` and ``# TYPE``, as ``encoder`` writes them."""
        headers = self._headers.get(content_type)
        if headers is None:
            headers = [
                _without_eof(
                    encoder(Families([GaugeMetricFamily(name, help_, labels=AGENT_LABELS)]))
                )
                for name, help_ in AGENT_GAUGES
            ]
            if len(self._headers) < _HEADER_FORMATS:
                self._headers[content_type] = headers
        return headers

    async def _render(self, reading: FleetReading) -> list[bytes]:
        """The sample lines of each per-agent family, in the order of ``AGENT_GAUGES``."""
        lines: list[list[str]] = [[] for _ in AGENT_GAUGES]
        slots, idle, processing, usable, prefill, hold = lines
        names = [name for name, _ in AGENT_GAUGES]
        async for chunk in self._view.slices(reading.agents, reading):
            for agent in chunk:
                snapshot = agent.snapshot
                labels = (
                    f'{{agent="{_escape(snapshot.name)}",model="{_escape(",".join(snapshot.models))}",'
                    f'url="{_escape(snapshot.url)}"}} '
                )
                slots.append(f"{names[0]}{labels}{snapshot.slots_total}.0\n")
                idle.append(f"{names[1]}{labels}{snapshot.slots_idle}.0\n")
                processing.append(f"{names[2]}{labels}{snapshot.slots_processing}.0\n")
                usable.append(f"{names[3]}{labels}{'1.0' if agent.usable else '0.0'}\n")
                if agent.prefill_rate is not None:
                    prefill.append(f"{names[4]}{labels}{_number(agent.prefill_rate)}\n")
                if agent.slot_hold is not None:
                    hold.append(f"{names[5]}{labels}{_number(agent.slot_hold)}\n")
        return ["".join(family).encode() for family in lines]


def _number(value: float) -> str:
    if math.isfinite(value):
        return repr(float(value))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _escape(value: str) -> str:
    """A label value as both formats write it: backslash, double quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _without_eof(exposition: bytes) -> bytes:
    return exposition.removesuffix(_EOF)
