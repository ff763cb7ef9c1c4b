"""The command line: every flag documented and settable from the environment."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from paddler.cli import DURATION, cli


@pytest.mark.parametrize("command", ["agent", "balancer", "cluster"])
def test_every_flag_has_help_and_an_environment_variable(command: str) -> None:
    """Each option explains itself and names its PADDLER_ variable."""
    subcommand = cli.commands[command]  # type: ignore[attr-defined]
    for parameter in subcommand.params:
        if not isinstance(parameter, click.Option) or parameter.name == "help":
            continue
        assert parameter.help, parameter.name
        long_name = parameter.opts[0].split("/")[0]
        assert parameter.envvar == "PADDLER_" + long_name[2:].upper().replace("-", "_")
        assert parameter.show_envvar


@pytest.mark.parametrize("command", ["agent", "balancer", "cluster"])
def test_help_lists_every_flag(command: str) -> None:
    """--help shows every option of the subcommand."""
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    for parameter in cli.commands[command].params:  # type: ignore[attr-defined]
        assert parameter.opts[0] in result.output


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60", 60.0), ("60s", 60.0), ("500ms", 0.5), ("2m", 120.0), ("1.5h", 5400.0)],
)
def test_durations_accept_units(text: str, seconds: float) -> None:
    """Durations are seconds, with an optional ms/s/m/h unit."""
    assert DURATION.convert(text, None, None) == seconds


def test_a_bad_duration_is_a_usage_error() -> None:
    """A malformed duration is refused with a message naming the value."""
    result = CliRunner().invoke(cli, ["balancer", "--request-buffer-timeout", "soon"])
    assert result.exit_code == 2
    assert "'soon' is not a duration" in result.output


def test_a_public_management_address_needs_a_token() -> None:
    """The balancer refuses to expose an unauthenticated management port beyond loopback."""
    result = CliRunner().invoke(cli, ["balancer", "--management-host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "--management-token" in result.output


def test_environment_variables_set_flags() -> None:
    """PADDLER_* variables reach the configuration like flags do."""
    result = CliRunner().invoke(
        cli,
        ["balancer"],
        env={"PADDLER_MANAGEMENT_HOST": "0.0.0.0", "PADDLER_REQUEST_BUFFER_SIZE": "x"},
    )
    assert result.exit_code == 2
    assert (
        "PADDLER_REQUEST_BUFFER_SIZE" in result.output
        or "'x' is not a valid integer" in result.output
    )
