"""The dashboard turns the management API's JSON into typed values, or says what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from paddler.dashboard.snapshot import InvalidAnswer, parse_fleet, parse_stats
from tests.support.fake_management_api import agent_json


def fleet_body(*agents: Any, **fields: Any) -> dict[str, Any]:
    body = {"agents": list(agents), "slots_idle": 3, "slots_processing": 1, "requests_buffered": 2}
    body.update(fields)
    return body


def test_an_agents_answer_becomes_a_typed_fleet() -> None:
    """Every field the dashboard shows is read, and the totals come from the balancer."""
    fleet = parse_fleet(
        fleet_body(
            agent_json("alpha", 9001, idle=3, processing=1, models=["qwen"]),
            agent_json("beta", 9002, idle=0, state="loading", circuit_open=True),
        )
    )
    alpha, beta = fleet.agents
    assert (alpha.name, alpha.url, alpha.models) == ("alpha", "http://127.0.0.1:9001", ("qwen",))
    assert (alpha.slots_idle, alpha.slots_processing, alpha.slots_total) == (3, 1, 4)
    assert alpha.last_report_age == 0.2
    assert alpha.usable and not beta.usable
    assert (fleet.slots_idle, fleet.slots_processing, fleet.slots_total) == (3, 1, 4)
    assert (fleet.requests_buffered, fleet.usable_agents) == (2, 1)


def test_fields_the_dashboard_does_not_know_are_ignored() -> None:
    """A newer balancer may add fields without breaking an older dashboard."""
    fleet = parse_fleet(fleet_body(agent_json("alpha", 9001, idle=1, gpu="A100"), version=5))
    assert fleet.agents[0].name == "alpha"


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ([], "the agents answer should be a JSON object"),
        (fleet_body(agents={}), "agents should be list"),
        (fleet_body(requests_buffered=None), "requests_buffered should be int"),
        (fleet_body(slots_idle=True), "slots_idle should be int, got True"),
        (fleet_body(slots_idle=-1), "slots_idle should not be negative"),
        (fleet_body(agent_json("a", 1, idle=1, error=7)), "agents[0].error should be a string"),
        (fleet_body(agent_json("a", 1, idle=1, models=[1])), "agents[0].models should be a list"),
        (fleet_body(agent_json("a", 1, idle=1, circuit_open=0)), "agents[0].circuit_open"),
        (fleet_body("alpha"), "agents[0] should be a JSON object"),
    ],
)
def test_a_malformed_agents_answer_is_refused_with_the_field_at_fault(
    body: Any, complaint: str
) -> None:
    """The error names the field and what was wrong with it."""
    with pytest.raises(InvalidAnswer) as raised:
        parse_fleet(body)
    assert complaint in str(raised.value)


def test_a_stats_answer_becomes_per_second_series() -> None:
    """Counts per interval are divided by the interval; gauges are kept as they are."""
    stats = parse_stats(
        {
            "interval_seconds": 2,
            "window_seconds": 600,
            "series": [
                {
                    "t": 1_700_000_000,
                    "requests": 6,
                    "errors": 2,
                    "requests_buffered": 3,
                    "slots_processing": 4,
                    "slots_total": 8,
                }
            ],
        }
    )
    assert stats.requests_per_second() == [3.0]
    assert stats.errors_per_second() == [1.0]
    assert stats.requests_buffered() == [3.0]
    assert stats.slots_processing() == [4.0]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"interval_seconds": 0, "window_seconds": 600, "series": []}, "should be positive"),
        ({"interval_seconds": 1, "window_seconds": 600}, "series is missing"),
        (
            {"interval_seconds": 1, "window_seconds": 600, "series": [{"t": 1}]},
            "series[0].requests is missing",
        ),
    ],
)
def test_a_malformed_stats_answer_is_refused(body: Any, complaint: str) -> None:
    """Traffic history of the wrong shape is an error, not a chart of nonsense."""
    with pytest.raises(InvalidAnswer) as raised:
        parse_stats(body)
    assert complaint in str(raised.value)
