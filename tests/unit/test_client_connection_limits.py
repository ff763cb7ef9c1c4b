"""The client-connection flags: validated at start-up, and a file limit that lets the cap bite."""

from __future__ import annotations

import resource

import pytest

from paddler.cli.process import raise_open_file_limit
from paddler.config import BalancerConfig


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("client_header_timeout", "--client-header-timeout"),
        ("client_body_timeout", "--client-body-timeout"),
        ("client_keepalive_timeout", "--client-keepalive-timeout"),
        ("max_client_connections", "--max-client-connections"),
    ],
)
def test_client_timeouts_and_the_connection_cap_must_be_positive(field: str, flag: str) -> None:
    """Zero for any of them is refused, naming the flag."""
    with pytest.raises(ValueError, match=flag):
        BalancerConfig(**{field: 0}).validate()  # type: ignore[arg-type]


def test_the_open_file_soft_limit_is_raised_to_the_hard_limit() -> None:
    """So that --max-client-connections, not EMFILE, is what a flood of connections meets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = 256
    assert hard == resource.RLIM_INFINITY or hard > lowered
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raise_open_file_limit(100)
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
