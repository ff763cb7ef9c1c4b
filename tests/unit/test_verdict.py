"""Whose fault an upstream answer is: the table every retry and circuit decision follows."""

from __future__ import annotations

import pytest

from paddler.balancer.proxy.verdict import Action, Fault, Verdict, judge


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304])
def test_answers_below_400_are_relayed_as_successes(status: int) -> None:
    """Success and redirects go to the client and count for the server."""
    assert judge(status, failed_elsewhere=False, can_retry=True) == Verdict(
        Fault.NONE, Action.RELAY
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 429])
def test_every_4xx_is_the_requests_own_and_never_retried(status: int) -> None:
    """Bad JSON, a context overflow or a missing key would fail on any server alike."""
    for can_retry in (True, False):
        assert judge(status, failed_elsewhere=False, can_retry=can_retry) == Verdict(
            Fault.REQUEST, Action.RELAY
        )


def test_a_501_is_the_requests_own_but_another_server_may_offer_the_route() -> None:
    """llama.cpp without --embeddings answers 501; a server started with it may serve it."""
    assert judge(501, failed_elsewhere=False, can_retry=True) == Verdict(
        Fault.REQUEST, Action.RETRY
    )
    assert judge(501, failed_elsewhere=False, can_retry=False) == Verdict(
        Fault.REQUEST, Action.RELAY
    )


@pytest.mark.parametrize("status", [502, 503, 504])
def test_502_503_504_before_any_byte_are_evidence_against_the_server(status: int) -> None:
    """The server's own front door says it is not serving: try another one."""
    for failed_elsewhere in (True, False):
        for can_retry in (True, False):
            assert judge(status, failed_elsewhere=failed_elsewhere, can_retry=can_retry) == Verdict(
                Fault.SERVER, Action.RETRY
            )


@pytest.mark.parametrize("status", [500, 505, 507, 599])
def test_another_5xx_is_judged_by_what_another_server_answers(status: int) -> None:
    """Alone it is unsure; after another server's 5xx to the same request, the request's."""
    assert judge(status, failed_elsewhere=False, can_retry=True) == Verdict(
        Fault.UNSURE, Action.RETRY
    )
    assert judge(status, failed_elsewhere=False, can_retry=False) == Verdict(
        Fault.UNSURE, Action.RELAY
    )
    assert judge(status, failed_elsewhere=True, can_retry=True) == Verdict(
        Fault.REQUEST, Action.RELAY
    )
