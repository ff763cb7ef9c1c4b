"""``/dashboard`` on the management port: served only when enabled, self-contained, locked down."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.balancer import running_balancer


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/dashboard.js", "/dashboard/"])
async def test_the_dashboard_is_not_found_unless_enabled(
    session: aiohttp.ClientSession, path: str
) -> None:
    """By default the management port serves no dashboard at all."""
    async with (
        running_balancer() as running,
        session.get(f"{running.management_url}{path}", allow_redirects=False) as response,
    ):
        assert response.status == 404


async def test_the_enabled_dashboard_serves_its_page_script_and_stylesheet(
    session: aiohttp.ClientSession,
) -> None:
    """The page and its two files come from the package, with a strict content policy."""
    async with running_balancer(management_dashboard_enable=True) as running:
        expected = {
            "/dashboard": "text/html",
            "/dashboard/dashboard.js": "text/javascript",
            "/dashboard/dashboard.css": "text/css",
        }
        for path, content_type in expected.items():
            async with session.get(f"{running.management_url}{path}") as response:
                assert response.status == 200, path
                assert response.content_type == content_type
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                text = await response.text()
                assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
                assert "https://" not in text


async def test_a_trailing_slash_redirects_to_the_dashboard(
    session: aiohttp.ClientSession,
) -> None:
    """``/dashboard/`` sends the browser to ``/dashboard``, where its relative links resolve."""
    async with (
        running_balancer(management_dashboard_enable=True) as running,
        session.get(f"{running.management_url}/dashboard/") as response,
    ):
        assert response.status == 200
        assert response.url.path == "/dashboard"
