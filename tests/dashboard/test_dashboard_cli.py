"""``paddler dashboard``: documented flags, each settable from the environment."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from paddler.cli import cli
from paddler.dashboard.app import DashboardApp


def test_every_dashboard_flag_has_help_and_an_environment_variable() -> None:
    """Each option explains itself and names its PADDLER_ variable."""
    command = cli.commands["dashboard"]
    names = []
    for parameter in command.params:
        if not isinstance(parameter, click.Option) or parameter.name == "help":
            continue
        assert parameter.help, parameter.name
        long_name = parameter.opts[0]
        assert parameter.envvar == "PADDLER_" + long_name[2:].upper().replace("-", "_")
        assert parameter.show_envvar
        names.append(long_name)
    assert names == [
        "--management-addr",
        "--refresh-interval",
        "--management-scheme",
        "--management-ca-file",
    ]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[DashboardApp]:
    """The apps the command would have run, not run."""
    apps: list[DashboardApp] = []

    def run(self: DashboardApp, *args: Any, **kwargs: Any) -> None:
        apps.append(self)

    monkeypatch.setattr(DashboardApp, "run", run)
    return apps


def test_the_dashboard_watches_the_local_balancer_every_second_by_default(
    started: list[DashboardApp],
) -> None:
    """Without flags it polls 127.0.0.1:8085 once a second."""
    result = CliRunner().invoke(cli, ["dashboard"], env={})
    assert result.exit_code == 0, result.output
    (app,) = started
    assert app.config.management_url == "http://127.0.0.1:8085"
    assert app.config.refresh_interval == 1.0


def test_flags_and_environment_variables_choose_the_balancer_and_the_interval(
    started: list[DashboardApp],
) -> None:
    """--management-addr and PADDLER_REFRESH_INTERVAL reach the configuration."""
    result = CliRunner().invoke(
        cli,
        ["dashboard", "--management-addr", "[::1]:9085"],
        env={"PADDLER_REFRESH_INTERVAL": "250ms"},
    )
    assert result.exit_code == 0, result.output
    (app,) = started
    assert app.config.management_url == "http://[::1]:9085"
    assert app.config.refresh_interval == 0.25


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--management-addr", "localhost"], "is not HOST:PORT"),
        (["--refresh-interval", "0"], "must be more than 0"),
    ],
)
def test_bad_dashboard_flags_are_usage_errors(
    arguments: list[str], complaint: str, started: list[DashboardApp]
) -> None:
    """A malformed address or a zero interval is refused before anything starts."""
    result = CliRunner().invoke(cli, ["dashboard", *arguments])
    assert result.exit_code == 2
    assert complaint in result.output
    assert started == []
