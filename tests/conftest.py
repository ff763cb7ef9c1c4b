"""Fixtures shared by every kind of test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for the test, closed after it."""
    async with aiohttp.ClientSession() as session:
        yield session
