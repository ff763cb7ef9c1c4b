"""Fixtures shared by every kind of test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import pytest
import uvloop

_ASYNCIO_ONLY = {"asyncio": asyncio.new_event_loop}
_BOTH_LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """A test marked ``both_event_loops`` runs twice: on asyncio's loop and on uvloop, the
    balancer's default (``paddler.cli.event_loop``), whose transports, TLS and subprocesses are
    its own code. The others run on asyncio's loop."""
    return _BOTH_LOOPS if item.get_closest_marker("both_event_loops") else _ASYNCIO_ONLY


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for the test, closed after it."""
    async with aiohttp.ClientSession() as session:
        yield session
