"""The kinds of values llama-server options take, and how they land in ``CommonParams``.

The building blocks of ``llamacpp_option_table``: an ``Option`` names its spellings, the dotted
``xllamacpp.CommonParams`` field it sets and its ``Kind``, which turns the option's text into the
field's value (or raises ``Invalid`` with what was expected). ``Write`` says how a value meets
what the field holds already. Nothing here imports xllamacpp: enum members are named
(``EnumRef``) and looked up when applied.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

INT32 = (-(2**31), 2**31 - 1)
UINT32_MAX = 2**32 - 1
CPUS = 512  # GGML_MAX_N_THREADS: the length of a CPU mask
_TRUE, _FALSE, _AUTO = (
    ("on", "enabled", "true", "1"),
    ("off", "disabled", "false", "0"),
    ("auto", "-1"),
)
MOE_EXPERTS = "\\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX


class Write(Enum):
    """How a value meets what the field holds already."""

    SET = "set"
    EXTEND = "extend"  # append to a list, add to a set
    MERGE = "merge"  # update a dict
    OR = "or"  # OR into a list of booleans: a CPU mask
    BITOR = "bitor"  # OR into an int of flag bits
    MAX = "max"
    JOIN = "join"  # append to a comma-separated string
    PAD = "pad"  # a shorter list replaces the start, the rest becomes 0
    SPLICE = "splice"  # a shorter list replaces the start; a single value fills the list


class Assign(NamedTuple):
    path: str
    value: object
    write: Write = Write.SET


@dataclass(frozen=True)
class EnumRef:
    """A member of one of xllamacpp's enums, looked up by name when applied."""

    enum: str
    member: str


@dataclass(frozen=True)
class Lora:
    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class FileText:
    """A file's text, read when applied (llama.cpp reads it while parsing its command line)."""

    path: str


@dataclass(frozen=True)
class Directory:
    """A directory that must exist when applied (or is then created); gets a trailing slash."""

    path: str
    create: bool = False


@dataclass(frozen=True)
class Grammar:
    kind: str  # a common_grammar_type member, without its prefix
    source: str | FileText
    schema: bool = False  # the source is a JSON schema, to turn into a grammar


class Invalid(ValueError):
    """A bad value whose message says what was expected, more precisely than the kind does."""


@dataclass(frozen=True)
class Kind:
    parse: Callable[[str], object]  # raises ValueError for a bad value
    expects: str  # for messages: "--temp expects a number; got 'hot'"
    example: str  # a valid value, for tests


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]
    target: str | tuple[str, ...]
    kind: Kind | None = None
    negations: tuple[str, ...] = ()
    on: object = True
    off: object = False
    write: Write = Write.SET
    extra: tuple[Assign, ...] = ()


def option(
    names: str,
    target: str | tuple[str, ...],
    kind: Kind | None = None,
    /,
    *,
    negations: str = "",
    **fields: object,
) -> Option:
    """An ``Option`` whose spellings are given space-separated, to keep the table one per line."""
    return Option(tuple(names.split()), target, kind, tuple(negations.split()), **fields)  # type: ignore[arg-type]


# -- kinds of value ---------------------------------------------------------------------------


def bounded_int(text: str, low: int = INT32[0], high: int = INT32[1]) -> int:
    value = int(text)
    if not low <= value <= high:
        raise ValueError(text)
    return value


def integer(
    low: int = INT32[0], high: int = INT32[1], words: Mapping[str, int] | None = None
) -> Kind:
    words = dict(words or {})
    limits = "" if (low, high) == INT32 else f" from {low}"
    limits += "" if high == INT32[1] else f" to {high}"
    *some, last = [f"an integer{limits}", *words]
    return Kind(
        lambda text: words[text] if text in words else bounded_int(text, low, high),
        f"{', '.join(some)} or {last}" if some else last,
        str(max(low, 1)),
    )


def number(low: float | None = None, *, above: bool = False) -> Kind:
    def parse(text: str) -> float:
        value = float(text)
        if low is not None and (value <= low if above else value < low):
            raise ValueError(text)
        return value

    bound = "" if low is None else f" {'above' if above else 'of at least'} {low:g}"
    return Kind(parse, f"a number{bound}", "1.5")


def choice(values: Mapping[str, object], aliases: Mapping[str, str] | None = None) -> Kind:
    values, aliases = dict(values), dict(aliases or {})
    return Kind(
        lambda text: values[aliases.get(text, text)],
        f"one of {', '.join(values)}",
        next(iter(values)),
    )


def switch(on: object, off: object, auto: object = None) -> Kind:
    """on, off (and auto), with llama.cpp's other spellings of them: enabled, true, 1, ..."""
    values, aliases = (
        {"on": on, "off": off},
        dict.fromkeys(_TRUE, "on") | dict.fromkeys(_FALSE, "off"),
    )
    if auto is not None:
        values["auto"] = auto
        aliases |= dict.fromkeys(_AUTO, "auto")
    return choice(values, aliases)


def named(enum: str, prefix: str, names: Mapping[str, str] | tuple[str, ...]) -> Kind:
    """llama.cpp's value names for members of an xllamacpp enum (default: the name, upper-cased)."""
    if isinstance(names, tuple):
        names = {name: name.upper().replace("-", "_").replace("+", "_") for name in names}
    return choice({name: EnumRef(enum, prefix + member) for name, member in names.items()})


def csv_items(text: str) -> tuple[str, ...]:
    return tuple(next(csv.reader([text]), []))  # as llama.cpp's parse_csv_row: a,"b,c"


def split_list(text: str) -> list[str]:
    return re.split(r"[,/]+", text)


def cpu_mask(text: str) -> tuple[bool, ...]:
    digits = text.removeprefix("0x")
    if not digits or len(digits) > CPUS // 4:
        raise ValueError(text)
    bits = int(digits, 16)
    return tuple(bool(bits >> cpu & 1) for cpu in range(CPUS))


def cpu_range(text: str) -> tuple[bool, ...]:
    low, dash, high = text.partition("-")
    first, last = int(low or 0), int(high) if high else CPUS - 1
    if not dash or not 0 <= first <= last < CPUS:
        raise ValueError(text)
    return tuple(first <= cpu <= last for cpu in range(CPUS))


def mib_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(part) for part in split_list(text))
    if min(sizes) < 0:
        raise ValueError(text)
    return tuple(size << 20 for size in sizes)


def scaled_loras(text: str) -> tuple[Lora, ...]:
    loras = []
    for item in csv_items(text):
        path, colon, scale = item.rpartition(":")
        if not colon or not path:
            raise Invalid("FNAME:SCALE items, comma-separated")
        loras.append(Lora(path, float(scale)))
    return tuple(loras)


def json_text(text: str) -> str:
    json.loads(text)
    return text


def template_kwargs(text: str) -> dict[str, str]:
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError(text)
    # llama.cpp keeps each value as its JSON text, as nlohmann's dump() writes it
    return {
        key: json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        for key, value in parsed.items()
    }


def thread_count(text: str) -> int:
    value = bounded_int(text)
    return value if value > 0 else os.cpu_count() or 1  # as llama.cpp: 0 or less is every core


def moe_layers(text: str) -> str:
    """llama.cpp's --n-cpu-moe, written as the tensor overrides it adds: layers 0..N-1 on CPU."""
    return ",".join(f"blk\\.{layer}{MOE_EXPERTS}=CPU" for layer in range(bounded_int(text, 0)))


def reciprocal(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return 1.0 / value


def sleep_seconds(text: str) -> int:
    value = int(text)
    if value == 0 or value < -1:
        raise ValueError(text)
    return value


def marked(mark: str) -> tuple[Assign, ...]:
    """Tells llama.cpp the operator chose this sampling value: the model's defaults must not win."""
    flag = EnumRef("common_params_sampling_config", f"COMMON_PARAMS_SAMPLING_CONFIG_{mark}")
    return (Assign("sampling.user_sampling_config", flag, Write.BITOR),)


def penalty_last_n(text: str) -> tuple[Assign, ...]:
    value = bounded_int(text, -1)
    # the sampler must remember at least as many tokens as it penalises
    return (Assign("sampling.penalty_last_n", value), Assign("sampling.n_prev", value, Write.MAX))


def grammar_kind(kind: str, *, file: bool = False, schema: bool = False) -> Kind:
    def parse(text: str) -> Grammar:
        return Grammar(
            kind, FileText(text) if file else json_text(text) if schema else text, schema
        )

    if file:
        return Kind(parse, "a file path", "schema.json" if schema else "grammar.gbnf")
    return Kind(
        parse, "a JSON schema" if schema else "a grammar", "{}" if schema else 'root ::= "a"'
    )


def ignored(text: str) -> tuple[Assign, ...]:
    return ()  # llama.cpp takes any value, and only warns that the option is deprecated


# fmt: off
