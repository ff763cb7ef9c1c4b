"""Host flags that name an EC2 metadata lookup."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from paddler.host_resolution import AWS_LOCAL_IPV4, HostResolutionError, resolve_host
from tests.support.upstream import fake_upstream


async def test_aws_local_ipv4_is_read_with_an_imdsv2_token() -> None:
    """The lookup asks for a session token, then presents it for the address."""
    seen: list[tuple[str, str, str | None]] = []

    async def metadata(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("X-aws-ec2-metadata-token")))
        if request.method == "PUT" and request.path == "/latest/api/token":
            return web.Response(text="session-token")
        if request.headers.get("X-aws-ec2-metadata-token") != "session-token":
            return web.Response(status=401)
        return web.Response(text="10.1.2.3\n")

    async with fake_upstream(metadata) as port:
        address = await asyncio.to_thread(resolve_host, AWS_LOCAL_IPV4, f"http://127.0.0.1:{port}")
    assert address == "10.1.2.3"
    assert seen == [
        ("PUT", "/latest/api/token", None),
        ("GET", "/latest/meta-data/local-ipv4", "session-token"),
    ]


def test_plain_hosts_are_left_alone() -> None:
    """Ordinary host names and addresses pass through without any lookup."""
    assert resolve_host("10.0.0.7", "http://127.0.0.1:9") == "10.0.0.7"


def test_an_unreachable_metadata_service_is_a_clear_error() -> None:
    """Outside EC2 the lookup fails with a message naming it, not a traceback."""
    with pytest.raises(HostResolutionError, match="did not answer"):
        resolve_host(AWS_LOCAL_IPV4, "http://127.0.0.1:9")
