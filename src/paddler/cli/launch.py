"""The options of a llama.cpp that Paddler starts itself: ``paddler agent --model`` and
``paddler cluster`` share them.

Any llama-server option passes through, spelled as for ``llama-server``, after ``--`` or in
``--llamacpp-args`` (``PADDLER_LLAMACPP_ARGS``): ``paddler agent --model m.gguf -- --embeddings
--pooling mean``. They are checked before anything starts.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from typing import Any

import click

from paddler.cli.options import GgufFile, option
from paddler.cli.process import require


def launch_options(
    *, model_help: str, threads_default: int, slots_default: int = 4
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.argument("llamacpp_arguments", nargs=-1, type=click.UNPROCESSED)(function)
        function = option(
            "--llamacpp-args",
            default="",
            show_default=False,
            help="More llama-server options, in one string (for the environment variable); the "
            "same as giving them after --, e.g. '--embeddings --pooling mean'.",
        )(function)
        function = option(
            "--model-alias",
            default=None,
            help="The model name llama.cpp reports and accepts [default: the file's path; "
            "clients may also use its file name, with or without .gguf].",
        )(function)
        function = option(
            "--threads",
            type=click.IntRange(0),
            default=threads_default,
            help="CPU threads of each llama.cpp (0: llama.cpp's choice).",
        )(function)
        function = option(
            "--context-size",
            type=click.IntRange(0),
            default=0,
            help="Total context of each llama.cpp in tokens, shared by its slots "
            "[default: 4096 per slot].",
        )(function)
        function = option(
            "--slots",
            type=click.IntRange(1, 256),
            default=slots_default,
            help="Parallel slots of each llama.cpp.",
        )(function)
        return option("--model", type=GgufFile(), default=None, help=model_help)(function)

    return decorate


def checked_llamacpp_args(inline: str, trailing: Sequence[str]) -> tuple[str, ...]:
    """The extra llama-server options, checked; a bad one is a usage error naming it."""
    try:
        arguments = (*shlex.split(inline), *trailing)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--llamacpp-args") from None
    if not arguments:
        return ()
    from paddler.agent.llamacpp_options import LlamaCppOptionError, parse

    try:
        parse(arguments)
    except LlamaCppOptionError as error:
        raise click.UsageError(str(error)) from None
    return arguments


def require_llamacpp() -> None:
    require("xllamacpp", "llamacpp", "Running llama.cpp (--model)")
