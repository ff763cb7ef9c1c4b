"""What the dashboard knows about the fleet: typed, immutable values parsed from the API's JSON.

Parsing checks the type of every field the dashboard uses and ignores fields it does not know, so
that a newer balancer that adds fields still works with an older dashboard.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


class InvalidAnswer(ValueError):
    """The balancer answered JSON of a shape the dashboard does not understand."""


@dataclass(frozen=True)
class AgentView:
    id: str
    name: str
    url: str
    state: str
    error: str | None
    models: tuple[str, ...]
    slots_idle: int
    slots_processing: int
    slots_total: int
    circuit_open: bool
    last_report_age: float
    verified: bool = True
    """False until the balancer reached the agent's address (older balancers do not say)."""
    verification: str | None = None

    @property
    def usable(self) -> bool:
        """Whether the balancer sends requests here at all (the same rule as its pool's)."""
        return self.verified and self.state == "ok" and not self.circuit_open


@dataclass(frozen=True)
class FleetView:
    """``GET /api/v1/agents``. The slot totals count usable agents only, as the balancer does."""

    agents: tuple[AgentView, ...]
    slots_idle: int
    slots_processing: int
    requests_buffered: int

    @property
    def slots_total(self) -> int:
        return self.slots_idle + self.slots_processing

    @property
    def usable_agents(self) -> int:
        return sum(agent.usable for agent in self.agents)


@dataclass(frozen=True)
class StatsPoint:
    """One interval of traffic; ``t`` is its start in unix seconds."""

    t: int
    requests: int
    errors: int
    requests_buffered: int
    slots_processing: int
    slots_total: int


@dataclass(frozen=True)
class Stats:
    """``GET /api/v1/stats``: recent traffic, one point per interval, oldest first."""

    interval_seconds: float
    window_seconds: float
    series: tuple[StatsPoint, ...]

    def requests_per_second(self) -> list[float]:
        return [point.requests / self.interval_seconds for point in self.series]

    def errors_per_second(self) -> list[float]:
        return [point.errors / self.interval_seconds for point in self.series]

    def requests_buffered(self) -> list[float]:
        return [float(point.requests_buffered) for point in self.series]

    def slots_processing(self) -> list[float]:
        return [float(point.slots_processing) for point in self.series]


@dataclass(frozen=True)
class DashboardSnapshot:
    """Everything one poll learned. ``stats`` is None when the balancer has no stats endpoint."""

    fleet: FleetView
    stats: Stats | None


def parse_fleet(body: Any) -> FleetView:
    root = _object(body, "the agents answer")
    agents = _field(root, "agents", list, "")
    return FleetView(
        agents=tuple(
            _parse_agent(_object(item, f"agents[{index}]"), f"agents[{index}].")
            for index, item in enumerate(agents)
        ),
        slots_idle=_count(root, "slots_idle", ""),
        slots_processing=_count(root, "slots_processing", ""),
        requests_buffered=_count(root, "requests_buffered", ""),
    )


def parse_stats(body: Any) -> Stats:
    root = _object(body, "the stats answer")
    interval = _number(root, "interval_seconds", "")
    if interval <= 0:
        raise InvalidAnswer(f"interval_seconds should be positive, got {interval!r}")
    series = _field(root, "series", list, "")
    return Stats(
        interval_seconds=interval,
        window_seconds=_number(root, "window_seconds", ""),
        series=tuple(
            _parse_point(_object(item, f"series[{index}]"), f"series[{index}].")
            for index, item in enumerate(series)
        ),
    )


def _parse_agent(item: Mapping[str, Any], where: str) -> AgentView:
    error = item.get("error")
    if error is not None and not isinstance(error, str):
        raise InvalidAnswer(f"{where}error should be a string or null, got {error!r}")
    verification = item.get("verification")
    if verification is not None and not isinstance(verification, str):
        raise InvalidAnswer(f"{where}verification should be a string or null, got {verification!r}")
    models = _field(item, "models", list, where)
    if not all(isinstance(model, str) for model in models):
        raise InvalidAnswer(f"{where}models should be a list of strings, got {models!r}")
    return AgentView(
        id=_field(item, "id", str, where),
        name=_field(item, "name", str, where),
        url=_field(item, "url", str, where),
        state=_field(item, "state", str, where),
        error=error,
        models=tuple(models),
        slots_idle=_count(item, "slots_idle", where),
        slots_processing=_count(item, "slots_processing", where),
        slots_total=_count(item, "slots_total", where),
        circuit_open=_field(item, "circuit_open", bool, where),
        last_report_age=_number(item, "last_report_age_seconds", where),
        verified=_field(item, "verified", bool, where) if "verified" in item else True,
        verification=verification,
    )


def _parse_point(item: Mapping[str, Any], where: str) -> StatsPoint:
    return StatsPoint(
        t=_count(item, "t", where),
        requests=_count(item, "requests", where),
        errors=_count(item, "errors", where),
        requests_buffered=_count(item, "requests_buffered", where),
        slots_processing=_count(item, "slots_processing", where),
        slots_total=_count(item, "slots_total", where),
    )


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidAnswer(f"{what} should be a JSON object, got {type(value).__name__}")
    return value


def _field(item: Mapping[str, Any], key: str, kind: type[_T], where: str) -> _T:
    if key not in item:
        raise InvalidAnswer(f"{where}{key} is missing")
    value = item[key]
    # bool is an int in Python, but never a count in JSON.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidAnswer(f"{where}{key} should be {kind.__name__}, got {value!r}")
    return value


def _count(item: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(item, key, int, where)
    if value < 0:
        raise InvalidAnswer(f"{where}{key} should not be negative, got {value}")
    return value


def _number(item: Mapping[str, Any], key: str, where: str) -> float:
    value = item.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return _field(item, key, float, where)
