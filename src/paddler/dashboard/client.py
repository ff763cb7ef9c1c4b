"""Reads the balancer's management API for the dashboard, and nothing else: it sends no token."""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Any

import aiohttp

from paddler.dashboard.snapshot import DashboardSnapshot, InvalidAnswer, parse_fleet, parse_stats

AGENTS_PATH = "/api/v1/agents"
STATS_PATH = "/api/v1/stats"


class FetchError(Exception):
    """A poll learned nothing; the message says why, for the operator."""


class BalancerUnreachable(FetchError):
    """No answer: nothing listens there, the connection broke, or the balancer is too slow."""


class UnexpectedAnswer(FetchError):
    """The balancer answered, but not with what the dashboard understands."""


class ManagementClient:
    """One HTTP session to one balancer's management port, for the life of the dashboard.

    Use it as an async context manager; ``fetch()`` then returns a snapshot or raises a
    ``FetchError``.
    """

    def __init__(
        self, base_url: str, timeout: float, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """``ssl_context`` verifies an ``https`` balancer (None: the system's trust store)."""
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ManagementClient:
        # Each phase gets its own limit: a balancer that accepts but never answers must not
        # freeze the dashboard, and its answers are small.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=self._timeout)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=2, ssl=self._ssl)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self) -> DashboardSnapshot:
        """The fleet, and its recent traffic when the balancer is new enough to keep it."""
        fleet_body = await self._get_json(AGENTS_PATH, missing_ok=False)
        stats_body = await self._get_json(STATS_PATH, missing_ok=True)
        try:
            fleet = parse_fleet(fleet_body)
            stats = parse_stats(stats_body) if stats_body is not None else None
        except InvalidAnswer as error:
            raise UnexpectedAnswer(f"the balancer's answer makes no sense here: {error}") from None
        return DashboardSnapshot(fleet=fleet, stats=stats)

    async def _get_json(self, path: str, *, missing_ok: bool) -> Any:
        """The JSON body of ``GET path``; None for a 404 when ``missing_ok``."""
        if self._session is None:
            raise RuntimeError("ManagementClient is used outside 'async with'")
        try:
            async with self._session.get(self._base_url + path) as response:
                if response.status == 404 and missing_ok:
                    return None
                if response.status != 200:
                    raise UnexpectedAnswer(f"GET {path} answered HTTP {response.status}")
                try:
                    return await response.json()
                except (aiohttp.ContentTypeError, ValueError):
                    raise UnexpectedAnswer(f"GET {path} did not answer JSON") from None
        except TimeoutError:
            raise BalancerUnreachable(f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as error:
            raise BalancerUnreachable(str(error) or type(error).__name__) from None
