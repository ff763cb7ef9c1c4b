"""The names a client may use for a model, and the one name the fleet lists it under.

llama.cpp names its model by the first ``--alias``, or, without one, by the path it was started
with (``/models/qwen2.5-7b-q4.gguf``). Clients cannot be expected to know another machine's paths,
so a model that is named by a path is also known by its file name, with and without ``.gguf``
(and without the ``-00001-of-00003`` of a split model): ``qwen2.5-7b-q4.gguf``,
``qwen2.5-7b-q4``. The shortest of these is its *id*: the name ``GET /v1/models`` lists, and
the one by which servers of the same file under different paths count as one model.
"""

from __future__ import annotations

import re

_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def _is_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.lower().endswith(".gguf")


def _file_name(name: str) -> str:
    return re.split(r"[\\/]", name)[-1]


def _stem(file_name: str) -> str:
    if file_name.lower().endswith(".gguf"):
        file_name = file_name[: -len(".gguf")]
    return _SPLIT_SUFFIX.sub("", file_name)


def model_id(name: str) -> str:
    """The name a model is listed under: a path's file stem, any other name as it is."""
    if not _is_path(name):
        return name
    return _stem(_file_name(name)) or name


def names_of(name: str) -> frozenset[str]:
    """Every name a client may send for the model llama.cpp calls ``name``."""
    if not _is_path(name):
        return frozenset({name})
    file_name = _file_name(name)
    names = {name, file_name}
    if file_name.lower().endswith(".gguf"):
        names.add(file_name[: -len(".gguf")])
    stem = _stem(file_name)
    if stem:
        names.add(stem)
    names.discard("")
    return frozenset(names)
