"""The web dashboard in real headless Chromium, against a live balancer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from paddler.protocol import LlamaCppState, Status
from tests.support.agent import running_agent
from tests.support.balancer import RunningBalancer, ScriptedAgent, ok, running_balancer, wait_until
from tests.support.browser import chromium
from tests.support.llamacpp import running_llamacpp
from tests.support.upstream import fake_upstream, not_found

TOKEN = "dashboard-secret-token"
NO_MODEL = "\u2013"  # what the page shows for an agent that reported no model


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


async def open_dashboard(browser: Browser, running: RunningBalancer) -> Page:
    page = await browser.new_page()
    await page.goto(f"{running.management_url}/dashboard")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # Survives only as long as this very document: a reload would lose it.
    await page.evaluate("window.sameDocument = true")
    return page


@pytest.mark.llamacpp
async def test_the_dashboard_follows_a_live_fleet_without_reloading(
    browser: Browser, session: aiohttp.ClientSession
) -> None:
    """Real agents appear, serve a request and leave, and the open page shows each change."""
    async with contextlib.AsyncExitStack() as stack:
        running = await stack.enter_async_context(
            running_balancer(management_token=TOKEN, management_dashboard_enable=True)
        )
        management_port = running.balancer.management_port or 0
        first_server = await stack.enter_async_context(running_llamacpp(slots=2))
        second_server = await stack.enter_async_context(running_llamacpp(slots=3))
        await stack.enter_async_context(
            running_agent(
                llamacpp_port=first_server.port,
                management_port=management_port,
                name="agent-first",
                token=TOKEN,
            )
        )
        await wait_until(lambda: len(running.pool.agents()) == 1, timeout=15)
        page = await open_dashboard(browser, running)

        first = page.locator("#agents tr", has_text="agent-first")
        await expect(first.locator('[data-field="state"]')).to_have_text("ok")
        await expect(first.locator('[data-field="url"]')).to_have_text(first_server.url)
        await expect(first.locator('[data-field="slots"]')).to_contain_text("/ 2")
        await expect(first.locator('[data-field="models"]')).not_to_have_text(NO_MODEL)
        await expect(page.locator("#agents-total")).to_have_text("1")
        await expect(page.locator("#slots-total")).to_have_text("2")

        body = {"prompt": "Hello", "n_predict": 4}
        async with session.post(f"{running.proxy_url}/completion", json=body) as response:
            assert response.status == 200
            await response.read()
        await expect(page.locator("#errors-hint")).to_contain_text("of 1)", timeout=5000)

        async with running_agent(
            llamacpp_port=second_server.port,
            management_port=management_port,
            name="agent-second",
            token=TOKEN,
        ):
            second = page.locator("#agents tr", has_text="agent-second")
            await expect(second.locator('[data-field="state"]')).to_have_text("ok", timeout=15000)
            await expect(page.locator("#agents-total")).to_have_text("2")
            await expect(page.locator("#slots-total")).to_have_text("5")
        # The agent deregisters as it stops.
        await expect(second).to_have_count(0, timeout=10000)
        await expect(page.locator("#agents-total")).to_have_text("1")
        await expect(first).to_have_count(1)

        assert await page.evaluate("window.sameDocument") is True
        assert TOKEN not in await page.content()
        for path in ("/api/v1/agents", "/api/v1/stats"):
            async with session.get(f"{running.management_url}{path}") as response:
                assert TOKEN not in await response.text()


async def test_the_dashboard_shows_failing_agents_and_a_lost_balancer(
    browser: Browser, session: aiohttp.ClientSession
) -> None:
    """An agent's error is shown as plain text, an open circuit is flagged, and so is a dead API.

    Scripted agents, because real llama.cpp cannot be made to report an arbitrary error text.
    """
    hostile = '<img src=x onerror="window.injected=1"> model failed to load'
    async with (
        fake_upstream(not_found) as healthy_port,
        fake_upstream(not_found) as broken_port,
        running_balancer(management_dashboard_enable=True) as running,
    ):
        healthy = ScriptedAgent(session, running.management_url)
        await healthy.register("healthy", healthy_port, ok(idle=4, models=("tiny",)))
        broken = ScriptedAgent(session, running.management_url)
        await broken.register(
            "broken", broken_port, Status(state=LlamaCppState.ERROR, slots_idle=0, error=hostile)
        )
        rogue = ScriptedAgent(session, running.management_url)
        await rogue.register("<b>rogue</b>", 1, ok(idle=60000), verified=False)
        page = await open_dashboard(browser, running)
        broken_row = page.locator("#agents tr", has_text="broken")
        await expect(broken_row.locator('[data-field="error"]')).to_have_text(hostile)
        await expect(broken_row.locator('[data-field="state"]')).to_have_text("error")
        rogue_row = page.locator("#agents tr", has_text="<b>rogue</b>")
        await expect(rogue_row.locator('[data-field="state"]')).to_have_text("unverified")
        await expect(rogue_row.locator('[data-field="error"]')).to_contain_text("cannot reach")
        await expect(page.locator("#agents-usable")).to_have_text("1")

        [agent] = [agent for agent in running.pool.agents() if agent.name == "healthy"]
        running.pool.trip(agent, "test")
        healthy_row = page.locator("#agents tr", has_text="healthy")
        await expect(healthy_row.locator('[data-field="circuit"]')).to_have_text("open")
        await expect(page.locator("#agents-usable")).to_have_text("0")
        assert await page.evaluate("window.injected") is None
        await healthy.close()
        await broken.close()
        await rogue.close()

    await expect(page.locator("#connection")).to_have_attribute("data-state", "lost")
    assert await page.evaluate("window.sameDocument") is True
