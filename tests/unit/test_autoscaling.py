"""The autoscaling rule: how many servers the fleet needs for its busy slots and buffered requests."""

from __future__ import annotations

import pytest

from paddler.balancer.management.autoscaling import advise


def test_busy_and_buffered_slots_over_the_target_give_the_desired_servers() -> None:
    """ceil((busy + buffered) / slots per server / target): 9 / 4 / 0.8 asks for 3 servers."""
    advice = advise(
        servers=2, slots_total=8, slots_busy=6, requests_buffered=3, target_utilization=0.8
    )
    assert advice.slots_per_server == 4
    assert advice.utilization == 0.75
    assert advice.desired_servers == 3
    assert advice.suggested_change == 1


def test_a_fleet_at_its_target_is_left_as_it_is() -> None:
    """Exactly the target utilization needs no change."""
    advice = advise(
        servers=5, slots_total=20, slots_busy=16, requests_buffered=0, target_utilization=0.8
    )
    assert advice.desired_servers == 5
    assert advice.suggested_change == 0


def test_float_error_never_adds_a_server() -> None:
    """7 / 0.7 is 10.000000000000002 in floats; the rule still asks for 10 servers, not 11."""
    advice = advise(
        servers=10, slots_total=10, slots_busy=7, requests_buffered=0, target_utilization=0.7
    )
    assert advice.desired_servers == 10


def test_an_idle_fleet_may_shrink_to_zero() -> None:
    """No demand asks for no servers; keeping a floor is the autoscaler's choice."""
    advice = advise(
        servers=3, slots_total=12, slots_busy=0, requests_buffered=0, target_utilization=0.8
    )
    assert advice.desired_servers == 0
    assert advice.suggested_change == -3


def test_a_quiet_fleet_shrinks_to_what_its_demand_needs() -> None:
    """One busy slot among three servers of four slots asks for one server."""
    advice = advise(
        servers=3, slots_total=12, slots_busy=1, requests_buffered=0, target_utilization=0.8
    )
    assert advice.desired_servers == 1
    assert advice.suggested_change == -2


def test_buffered_requests_with_no_server_ask_for_exactly_one() -> None:
    """Scale from zero: slots per server are unknown until one registers, so ask for one."""
    advice = advise(
        servers=0, slots_total=0, slots_busy=0, requests_buffered=12, target_utilization=0.8
    )
    assert advice.slots_per_server is None
    assert advice.utilization == 0.0
    assert advice.desired_servers == 1
    assert advice.suggested_change == 1


def test_no_server_and_no_demand_asks_for_nothing() -> None:
    """An empty, quiet fleet stays empty."""
    advice = advise(
        servers=0, slots_total=0, slots_busy=0, requests_buffered=0, target_utilization=0.8
    )
    assert advice.desired_servers == 0
    assert advice.suggested_change == 0


@pytest.mark.parametrize("target", [0.0, -0.5, 1.01])
def test_a_target_outside_zero_to_one_is_refused(target: float) -> None:
    """The target utilization is a share of slots: above 0, at most 1."""
    with pytest.raises(ValueError, match="target utilization"):
        advise(
            servers=1, slots_total=4, slots_busy=1, requests_buffered=0, target_utilization=target
        )
