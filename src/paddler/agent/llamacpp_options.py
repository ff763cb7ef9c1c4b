"""llama-server's own command-line options, for the llama.cpp that ``paddler agent --model`` runs.

The embedded server is configured through ``xllamacpp.CommonParams`` field by field: xllamacpp
binds the server but not llama.cpp's command-line parser (``common_params_parse`` is in the
library, not in its Python API). So the translation from ``llama-server`` options to fields is
this hand-written table, ``paddler.agent.llamacpp_option_table.OPTIONS``, written from the
spellings and value names of llama.cpp's ``common/arg.cpp`` and of the installed wheel's parser.

- ``parse(args)`` is pure and needs no xllamacpp: it checks every option, its arity and its value,
  and returns the settings, or raises ``LlamaCppOptionError`` with one sentence naming the option.
  It takes ``--flag value`` and also ``--flag=value``; like llama.cpp, it reads ``--flag_name``
  as ``--flag-name``.
- ``apply(options, params)`` writes them, in order, on a real ``xllamacpp.CommonParams``.

To add an option, add one line to ``OPTIONS``: every spelling, the dotted field path (see
``dir(xllamacpp.CommonParams())``), and a ``Kind`` that turns its text into the field's value
(an ``EnumRef`` for enums); a switch has no kind, and its ``--no-...`` spellings go in
``negations``. Options that the agent sets itself, or that cannot work here, go in ``REFUSED``
with the reason the operator reads. ``tests/agent/test_llamacpp_options.py`` applies every option
of the table to a real ``CommonParams``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from paddler.agent.llamacpp_option_kinds import (
    Assign,
    Directory,
    EnumRef,
    FileText,
    Grammar,
    Invalid,
    Lora,
    Option,
    Write,
)
from paddler.agent.llamacpp_option_table import OPTIONS, REFUSED


class LlamaCppOptionError(ValueError):
    """A llama.cpp option that the embedded server cannot take; the message names it."""


@dataclass(frozen=True)
class Setting:
    """What one option on the command line does: ``spelling`` as given, then its assignments."""

    spelling: str
    assignments: tuple[Assign, ...]


@dataclass(frozen=True)
class LlamaCppOptions:
    """Parsed llama.cpp options, in command-line order (later ones win, as in llama.cpp)."""

    settings: tuple[Setting, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.settings)


_SPELLINGS: dict[str, tuple[Option, bool]] = {
    spelling: (option, positive)
    for option in OPTIONS
    for spellings, positive in ((option.names, True), (option.negations, False))
    for spelling in spellings
}
_ACCEPTED = sorted(spelling for spelling in _SPELLINGS if spelling.startswith("--"))


def parse(args: Sequence[str]) -> LlamaCppOptions:
    """Check llama-server options and return what they set; no xllamacpp needed."""
    settings = []
    position = 0
    while position < len(args):
        arg = args[position]
        position += 1
        spelling, inline = _split(arg)
        if not spelling.startswith("-") or spelling in ("-", "--"):
            raise LlamaCppOptionError(
                f"unexpected argument {arg!r} among the llama.cpp options, which start with '-'"
            )
        if spelling in REFUSED:
            raise LlamaCppOptionError(f"llama.cpp option {spelling} {REFUSED[spelling]}")
        if spelling not in _SPELLINGS:
            raise LlamaCppOptionError(_unknown(spelling))
        option, positive = _SPELLINGS[spelling]
        if option.kind is None:
            if inline is not None:
                raise LlamaCppOptionError(f"{spelling} takes no value; got {arg!r}")
            value = option.on if positive else option.off
        else:
            if inline is None:
                inline = _following_value(spelling, option, args[position:])
                position += 1
            value = _value(spelling, option, inline)
        settings.append(Setting(spelling, _assignments(option, value)))
    return LlamaCppOptions(tuple(settings))


def apply(options: LlamaCppOptions, params: Any) -> None:
    """Write parsed options, in order, on ``params`` (an ``xllamacpp.CommonParams``)."""
    import xllamacpp  # here, not at the top: the balancer's host need not have it

    for setting in options.settings:
        for assignment in setting.assignments:
            try:
                _write(params, assignment, xllamacpp)
            except (OSError, ValueError, TypeError, OverflowError, KeyError) as error:
                raise LlamaCppOptionError(
                    f"llama.cpp option {setting.spelling} cannot be applied: {error}"
                ) from error


def _split(arg: str) -> tuple[str, str | None]:
    """``--name=value`` into its parts; llama.cpp also reads ``--name_x`` as ``--name-x``."""
    if not arg.startswith("--"):
        return arg, None
    name, equals, value = arg.partition("=")
    return name.replace("_", "-"), value if equals else None


def _following_value(spelling: str, option: Option, rest: Sequence[str]) -> str:
    """The argument after ``spelling`` as its value, unless it is missing or another option."""
    assert option.kind is not None
    if rest and _split(rest[0])[0] not in _SPELLINGS.keys() | REFUSED.keys():
        return rest[0]
    got = f"the option {rest[0]!r}" if rest else "nothing"
    raise LlamaCppOptionError(f"{spelling} expects {option.kind.expects}; got {got}")


def _unknown(spelling: str) -> str:
    close = difflib.get_close_matches(spelling, [*_SPELLINGS, *REFUSED], n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    accepted = ", ".join(_ACCEPTED)
    return f"unknown llama.cpp option {spelling!r}{hint} (the embedded llama.cpp server accepts: {accepted})"


def _value(spelling: str, option: Option, text: str) -> object:
    assert option.kind is not None
    try:
        return option.kind.parse(text)
    except Invalid as invalid:
        raise LlamaCppOptionError(f"{spelling} expects {invalid}; got {text!r}") from None
    except (ValueError, KeyError, ZeroDivisionError):
        raise LlamaCppOptionError(
            f"{spelling} expects {option.kind.expects}; got {text!r}"
        ) from None


def _assignments(option: Option, value: object) -> tuple[Assign, ...]:
    if option.target == "":
        assert isinstance(value, tuple)
        found: tuple[Assign, ...] = value
    else:
        targets = (option.target,) if isinstance(option.target, str) else option.target
        found = tuple(Assign(target, value, option.write) for target in targets)
    return found + option.extra


def _write(params: Any, assignment: Assign, xllamacpp: ModuleType) -> None:
    owner, _, field = assignment.path.rpartition(".")
    target = params
    for part in owner.split(".") if owner else ():
        target = getattr(target, part)
    value = _materialize(assignment.value, xllamacpp)
    write = assignment.write
    if write is not Write.SET:
        value = _combine(write, getattr(target, field), value, xllamacpp)
    setattr(target, field, value)


def _combine(write: Write, current: Any, value: Any, xllamacpp: ModuleType) -> Any:
    if write is Write.EXTEND:
        if isinstance(current, set):
            return current | set(value)
        # A CommonAdapterLoraInfo read from the params points into them: copy it before the
        # list it lives in is replaced.
        lora = xllamacpp.CommonAdapterLoraInfo
        copied = [
            lora(item.path, item.scale) if isinstance(item, lora) else item for item in current
        ]
        return copied + value
    if write is Write.MERGE:
        return {**current, **value}
    if write is Write.OR:
        return [old or new for old, new in zip(current, value, strict=True)]
    if write is Write.BITOR:
        return current | int(value)
    if write is Write.MAX:
        return max(current, value)
    if write is Write.JOIN:
        return ",".join(part for part in (current, value) if part)
    if len(value) >= len(current):  # PAD and SPLICE: llama.cpp's limit, one per device
        raise ValueError(
            f"{len(value)} values, but this llama.cpp takes at most {len(current) - 1}"
        )
    if write is Write.PAD:
        return value + [0.0] * (len(current) - len(value))
    assert write is Write.SPLICE
    return value * len(current) if len(value) == 1 else value + current[len(value) :]


def _materialize(value: object, xllamacpp: ModuleType) -> Any:
    """The value as xllamacpp takes it: enums looked up, files read, tuples made lists."""
    if isinstance(value, EnumRef):
        return getattr(xllamacpp, value.enum)[value.member]
    if isinstance(value, Lora):
        return xllamacpp.CommonAdapterLoraInfo(value.path, value.scale)
    if isinstance(value, FileText):
        return Path(value.path).read_text(encoding="utf-8")
    if isinstance(value, Directory):
        if value.create:
            os.makedirs(value.path, exist_ok=True)
        if not os.path.isdir(value.path):
            raise ValueError(f"not a directory: {value.path}")
        return value.path if value.path.endswith(os.sep) else value.path + os.sep
    if isinstance(value, Grammar):
        text = _materialize(value.source, xllamacpp)
        if value.schema:
            text = xllamacpp.json_schema_to_grammar(text)
        kind = xllamacpp.common_grammar_type[f"COMMON_GRAMMAR_TYPE_{value.kind}"]
        return xllamacpp.CommonGrammar(type=kind, grammar=text)
    if isinstance(value, tuple):
        return [_materialize(item, xllamacpp) for item in value]
    return value
