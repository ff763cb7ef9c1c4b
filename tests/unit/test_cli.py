"""The command line: every flag documented and settable from the environment."""

from __future__ import annotations

import importlib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from paddler.cli import cli
from paddler.cli.options import DURATION

# A repeatable option whose variable holds several values, as its plural name says.
_PLURAL_VARIABLES = {"--api-key": "PADDLER_API_KEYS"}


@pytest.mark.parametrize("command", ["agent", "balancer", "cluster"])
def test_every_flag_has_help_and_an_environment_variable(command: str) -> None:
    """Each option explains itself and names its PADDLER_ variable."""
    subcommand = cli.commands[command]  # type: ignore[attr-defined]
    for parameter in subcommand.params:
        if not isinstance(parameter, click.Option) or parameter.name == "help":
            continue
        if not parameter.expose_value:  # --no-agent-header: the same as --agent-header=false
            assert parameter.help, parameter.name
            continue
        assert parameter.help, parameter.name
        long_name = parameter.opts[0].split("/")[0]
        expected = _PLURAL_VARIABLES.get(
            long_name, "PADDLER_" + long_name[2:].upper().replace("-", "_")
        )
        assert parameter.envvar == expected
        assert parameter.show_envvar


@pytest.mark.parametrize("command", ["agent", "balancer", "cluster"])
def test_help_lists_every_flag(command: str) -> None:
    """--help shows every option of the subcommand."""
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    for parameter in cli.commands[command].params:  # type: ignore[attr-defined]
        if isinstance(parameter, click.Option):
            assert parameter.opts[0] in result.output
        else:
            assert parameter.human_readable_name in result.output


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


def test_the_upstream_read_timeout_must_be_positive_and_defaults_to_ten_minutes() -> None:
    """0 would make every request time out at once; --help says the default and why."""
    result = CliRunner().invoke(cli, ["balancer", "--upstream-read-timeout", "0s"])
    assert result.exit_code == 2
    assert "--upstream-read-timeout must be positive" in result.output
    help_text = " ".join(CliRunner().invoke(cli, ["balancer", "--help"]).output.split())
    assert "PADDLER_UPSTREAM_READ_TIMEOUT" in help_text
    assert "default: 10m" in help_text
    assert "non-streamed" in help_text


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


def _boolean_options() -> list[tuple[str, str, bool]]:
    found = []
    for name, command in cli.commands.items():  # type: ignore[attr-defined]
        for parameter in command.params:
            if (
                isinstance(parameter, click.Option)
                and parameter.expose_value
                and isinstance(parameter.type, click.types.BoolParamType)
            ):
                found.append((name, parameter.opts[0], bool(parameter.default)))
    return found


BOOLEAN_OPTIONS = _boolean_options()


def test_every_boolean_option_is_found() -> None:
    """The table below covers the boolean flags the original Paddler documents."""
    flags = {flag for _, flag, _ in BOOLEAN_OPTIONS}
    assert {"--management-dashboard-enable", "--statsd-enable", "--rewrite-host-header"} <= flags
    assert all(
        not (isinstance(parameter, click.Option) and parameter.is_flag and parameter.expose_value)
        for command in cli.commands.values()  # type: ignore[attr-defined]
        for parameter in command.params
    ), "a click is_flag option does not accept --flag=true: use cli.options.flag()"


@pytest.mark.parametrize(("command", "flag", "default"), BOOLEAN_OPTIONS)
@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("{flag}", True),
        ("{flag}=true", True),
        ("{flag}=false", False),
        ("{flag}=1", True),
        ("{flag}=0", False),
        ("{flag}=yes", True),
        ("{flag}=no", False),
        ("{flag}=True", True),
        ("{flag}=FALSE", False),
    ],
)
def test_every_boolean_flag_takes_go_style_values(
    command: str, flag: str, default: bool, spelling: str, expected: bool
) -> None:
    """--flag, --flag=true|false, 1|0 and yes|no, as the original's Go flags accept them."""
    subcommand = cli.commands[command]  # type: ignore[attr-defined]
    context = subcommand.make_context(command, [spelling.format(flag=flag)])
    assert context.params[flag[2:].replace("-", "_")] is expected
    assert subcommand.make_context(command, []).params[flag[2:].replace("-", "_")] is default


@pytest.mark.parametrize(("command", "flag", "default"), BOOLEAN_OPTIONS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False)],
)
def test_every_boolean_environment_variable_takes_the_same_values(
    command: str, flag: str, default: bool, value: str, expected: bool
) -> None:
    """PADDLER_STATSD_ENABLE=yes and friends mean what --statsd-enable=yes means."""
    from paddler.cli.options import envvar_for

    subcommand = cli.commands[command]  # type: ignore[attr-defined]
    runner = CliRunner(env={envvar_for(flag): value})
    with runner.isolation():
        context = subcommand.make_context(command, [])
    assert context.params[flag[2:].replace("-", "_")] is expected


def test_a_boolean_flag_refuses_a_value_that_is_not_one() -> None:
    """--statsd-enable=maybe is a usage error naming the value."""
    result = CliRunner().invoke(cli, ["balancer", "--statsd-enable=maybe"])
    assert result.exit_code == 2
    assert "'maybe' is not a valid boolean" in result.output


def test_negative_spellings_still_work() -> None:
    """--no-agent-header, as before, is the same as --agent-header=false."""
    command = cli.commands["balancer"]  # type: ignore[attr-defined]
    assert command.make_context("balancer", ["--no-agent-header"]).params["agent_header"] is False
    assert command.make_context("balancer", []).params["agent_header"] is True


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("1h2m", 3720.0), ("250ms", 0.25), ("1.5s", 1.5), ("100us", 0.0001)],
)
def test_durations_accept_go_syntax(text: str, seconds: float) -> None:
    """--request-buffer-timeout=1m30s works as in the original."""
    assert DURATION.convert(text, None, None) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "1m30", "m1", "-5s", "1 m"])
def test_malformed_durations_are_refused(text: str) -> None:
    """Half a duration is not one."""
    with pytest.raises(click.BadParameter):
        DURATION.convert(text, None, None)


def test_a_model_that_is_not_a_gguf_file_is_refused_at_once(tmp_path: Path) -> None:
    """paddler agent --model on a text file fails before anything starts, saying why."""
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_text("this is not a model")
    result = CliRunner().invoke(cli, ["agent", "--model", str(not_a_model)])
    assert result.exit_code == 2
    assert "is not a GGUF model file" in result.output


def test_an_unknown_llamacpp_option_is_refused_at_once(tmp_path: Path) -> None:
    """A misspelled llama-server option fails before llama.cpp starts, naming it."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    result = CliRunner().invoke(cli, ["agent", "--model", str(model), "--", "--embedingz"])
    assert result.exit_code == 2
    assert "--embedingz" in result.output


def test_llamacpp_options_need_a_model() -> None:
    """Options for llama.cpp make sense only when the agent runs llama.cpp."""
    result = CliRunner().invoke(cli, ["agent", "--", "--embeddings"])
    assert result.exit_code == 2
    assert "need --model" in result.output


def test_the_cluster_takes_the_balancers_routing_and_model_flags() -> None:
    """--routing, --prefix-index-memory and --allow-unknown-models mean the same in both."""
    shared = {"--routing", "--prefix-index-memory", "--allow-unknown-models"}
    shared |= {"--request-buffer-size", "--request-buffer-timeout"}
    for name in ("balancer", "cluster"):
        command = cli.commands[name]  # type: ignore[attr-defined]
        assert shared <= {opt for parameter in command.params for opt in parameter.opts}


def _agent_configs(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The configs ``paddler agent`` builds, with nothing run."""
    # The module, not the command that paddler.cli names the same.
    agent_command = importlib.import_module("paddler.cli.agent")
    built: list[object] = []
    build = agent_command._agent_config

    def recording(*args: object) -> object:
        built.append(build(*args))  # type: ignore[arg-type]
        return built[-1]

    monkeypatch.setattr(agent_command, "_agent_config", recording)
    monkeypatch.setattr(agent_command, "run_until_signalled", lambda *args, **kwargs: None)
    return built


def test_agent_takes_several_balancers_in_the_order_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--management-addr`` repeats (IPv6 in brackets, a repeated address once); the first is
    also the one ``--management-host`` and ``--management-port`` would have named."""
    built = _agent_configs(monkeypatch)
    arguments = ["agent", "--management-addr", "10.0.0.1:8085", "--management-addr", "[::1]:9000"]
    result = CliRunner().invoke(cli, [*arguments, "--management-addr", "10.0.0.1:8085"])
    assert result.exit_code == 0, result.output
    config = built[0]
    assert config.balancers == (("10.0.0.1", 8085), ("::1", 9000))  # type: ignore[attr-defined]
    assert (config.management_host, config.management_port) == ("10.0.0.1", 8085)  # type: ignore[attr-defined]


def test_agent_reads_several_balancers_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PADDLER_MANAGEMENT_ADDR`` takes the addresses separated by spaces."""
    built = _agent_configs(monkeypatch)
    runner = CliRunner(env={"PADDLER_MANAGEMENT_ADDR": "10.0.0.1:8085 10.0.0.2:8085"})
    result = runner.invoke(cli, ["agent"])
    assert result.exit_code == 0, result.output
    assert built[0].balancers == (("10.0.0.1", 8085), ("10.0.0.2", 8085))  # type: ignore[attr-defined]


def test_agent_without_management_addr_links_to_management_host_and_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The original's two flags still name the one balancer."""
    built = _agent_configs(monkeypatch)
    result = CliRunner().invoke(
        cli, ["agent", "--management-host", "10.0.0.9", "--management-port", "9085"]
    )
    assert result.exit_code == 0, result.output
    assert built[0].balancers == (("10.0.0.9", 9085),)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--management-addr", "10.0.0.1"], "is not HOST:PORT"),
        (["--management-addr", "10.0.0.1:0"], "is not a port between 1 and 65535"),
        (
            ["--management-addr", "10.0.0.1:8085", "--management-port", "9085"],
            "give --management-addr or --management-port, not both",
        ),
    ],
)
def test_agent_refuses_a_management_addr_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch, arguments: list[str], complaint: str
) -> None:
    """A malformed address, or one beside the flags it replaces, is a usage error."""
    _agent_configs(monkeypatch)
    result = CliRunner().invoke(cli, ["agent", *arguments])
    assert result.exit_code == 2
    assert complaint in result.output


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--state", "postgres://db/0"], "--state must be memory:// or a Redis URL"),
        (
            ["--state", "redis://127.0.0.1:6379/0", "--workers", "2"],
            "--workers and a shared --state do not go together yet",
        ),
        (["--state", "redis://127.0.0.1:6379/0", "--lease-timeout", "0s"], "must be positive"),
    ],
)
def test_balancer_refuses_a_state_it_cannot_use(arguments: list[str], complaint: str) -> None:
    """A state that is not a Redis URL, or one beside --workers, is a usage error."""
    result = CliRunner().invoke(cli, ["balancer", *arguments])
    assert result.exit_code == 2
    assert complaint in " ".join(result.output.split())
