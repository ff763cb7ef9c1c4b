"""Option kinds shared by every subcommand: environment variables, booleans, durations, models.

- Every option can also be set from ``PADDLER_<NAME>`` (``--request-buffer-size`` is
  ``PADDLER_REQUEST_BUFFER_SIZE``).
- Every boolean option accepts ``--flag``, ``--flag=true|false`` (also ``1|0``, ``yes|no``,
  ``on|off``) and its variable with the same values, as the original Paddler's Go flags do.
- Durations are seconds with an optional unit, or Go's duration syntax: ``60``, ``60s``,
  ``500ms``, ``2m``, ``1m30s``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_BARE_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, with an optional unit, or a Go duration: ``60``, ``60s``, ``500ms``, ``1m30s``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        if _BARE_NUMBER.match(text):
            return float(text)
        position, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            position = match.end()
        if not text or position != len(text):
            self.fail(f"{value!r} is not a duration such as 60s, 500ms, 2m or 1m30s", param, ctx)
        return seconds


DURATION = Duration()
PORT = click.IntRange(0, 65535)


class CommaSeparated(click.ParamType):  # type: ignore[type-arg]
    """A repeatable option's value whose environment variable lists values between commas
    (``PADDLER_API_KEYS=a,b``); blanks around and between them are ignored."""

    name = "text"

    def split_envvar_value(self, rv: str) -> list[str]:
        return [part.strip() for part in (rv or "").split(",") if part.strip()]


COMMA_SEPARATED = CommaSeparated()
READABLE_FILE = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)


class GgufFile(click.Path):
    """An existing GGUF model file: refused at once if it is anything else."""

    name = "gguf file"

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, readable=True, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            self.fail(
                f"{str(path)!r} is not a GGUF model file (it does not start with 'GGUF'); "
                "llama.cpp loads .gguf files only",
                param,
                ctx,
            )
        return path


def envvar_for(long_name: str) -> str:
    return "PADDLER_" + long_name.removeprefix("--").upper().replace("-", "_")


def option(*names: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option that can also be set from ``PADDLER_<NAME>`` (or the ``envvar`` given)."""
    long_name = next(name for name in names if name.startswith("--")).split("/")[0]
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("envvar", envvar_for(long_name))
    return click.option(*names, show_envvar=True, **kwargs)


def flag(
    name: str, *, help: str, default: bool = False, negative: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A boolean option: ``--name``, ``--name=true|false|1|0|yes|no``, or its variable.

    ``negative`` adds an option such as ``--no-agent-header``, the same as ``--name=false``.
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if negative is not None:
            dest = name.removeprefix("--").replace("-", "_")

            def set_false(ctx: click.Context, param: click.Parameter, value: bool) -> None:
                if value:
                    ctx.params[dest] = False

            function = click.option(
                negative,
                is_flag=True,
                expose_value=False,
                callback=set_false,
                help=f"The same as {name}=false.",
            )(function)
        return option(
            name,
            type=click.BOOL,
            is_flag=False,
            flag_value=True,
            default=default,
            metavar="[true|false]",
            help=help,
        )(function)

    return decorate


def logging_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        help="Log lines as text, or as one JSON object per line (for log shippers).",
    )(function)
    return option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        help="How much to log.",
    )(function)


def event_loop_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--event-loop``: ``balancer``, ``agent`` and ``cluster`` (see ``cli.event_loop``)."""
    from paddler.config import EVENT_LOOPS

    return option(
        "--event-loop",
        type=click.Choice(EVENT_LOOPS),
        default=EVENT_LOOPS[0],
        help="The event loop to run on. uvloop (the default) costs the balancer less CPU per "
        "request and per streamed chunk; where it cannot be imported, asyncio's loop runs "
        "instead and the startup log line says why. asyncio: the standard library's loop.",
    )(function)


def buffer_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """How many requests may wait for a slot, and how long: ``balancer`` and ``cluster``."""
    function = option(
        "--request-buffer-timeout",
        type=DURATION,
        default="60s",
        help="How long a request may wait for a free slot before it gets 504.",
    )(function)
    return option(
        "--request-buffer-size",
        type=click.IntRange(0),
        default=20,
        help="How many requests may wait for a free slot; beyond that they get 503 with "
        "Retry-After.",
    )(function)


def routing_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """How the balancer picks servers and treats model names: ``balancer`` and ``cluster``."""
    from paddler.config import ROUTING_POLICIES

    function = flag(
        "--allow-unknown-models",
        help="Send a request that names a model no agent serves to any agent instead of "
        "answering 404. Only matters in a fleet of several models: one of a single model "
        "serves any name, as a single llama.cpp does.",
    )(function)
    function = option(
        "--prefix-index-memory",
        type=click.IntRange(0),
        default=64 * 1024 * 1024,
        help="Most bytes the prefix index of --routing prefix may hold; the least recently "
        "used prefixes are forgotten first.",
    )(function)
    return option(
        "--routing",
        type=click.Choice(ROUTING_POLICIES),
        default="prefix",
        help="How to choose among servers with a free slot. prefix: prefer the server whose "
        "llama.cpp most likely holds the prompt's prefix in its cache, weighed against load "
        "(see docs/routing.md). slots: the server with the most free slots.",
    )(function)
