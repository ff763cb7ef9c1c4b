"""The dashboard's management address: HOST:PORT in, a URL to poll out."""

from __future__ import annotations

import pytest

from paddler.config import parse_host_port
from paddler.dashboard.config import DashboardConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8085", ("127.0.0.1", 8085)),
        ("balancer.internal:9000", ("balancer.internal", 9000)),
        ("[::1]:8085", ("::1", 8085)),
        ("aws:metadata:local-ipv4:8085", ("aws:metadata:local-ipv4", 8085)),
    ],
)
def test_a_management_address_is_host_and_port(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT splits at the last colon; brackets around an IPv6 host are dropped."""
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["8085", "localhost", ":8085", "host:http", "host:0", "h:70000"])
def test_a_malformed_management_address_is_refused(text: str) -> None:
    """Anything but HOST:PORT with a port from 1 to 65535 is an error."""
    with pytest.raises(ValueError, match=r"HOST:PORT|port between"):
        parse_host_port(text)


def test_an_ipv6_management_address_is_bracketed_in_the_url() -> None:
    """The URL the dashboard polls puts an IPv6 host in brackets."""
    config = DashboardConfig(management_host="::1", management_port=8085)
    assert config.management_url == "http://[::1]:8085"
