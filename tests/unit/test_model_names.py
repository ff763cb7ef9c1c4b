"""The names a model is known by, and the id the fleet lists it under."""

from __future__ import annotations

import pytest

from paddler.balancer.fleet.model_names import model_id, names_of


def test_an_alias_is_known_by_itself_alone() -> None:
    """A server started with --alias answers to that alias, exactly."""
    assert names_of("qwen-7b") == {"qwen-7b"}
    assert model_id("qwen-7b") == "qwen-7b"


def test_a_path_is_known_by_its_file_name_with_and_without_gguf() -> None:
    """llama.cpp without --alias names its model by the path it was started with."""
    assert names_of("/models/qwen2.5-7b-q4.gguf") == {
        "/models/qwen2.5-7b-q4.gguf",
        "qwen2.5-7b-q4.gguf",
        "qwen2.5-7b-q4",
    }
    assert model_id("/models/qwen2.5-7b-q4.gguf") == "qwen2.5-7b-q4"


def test_the_same_file_under_different_paths_is_one_model() -> None:
    """Two hosts keep their models in different folders; clients see one model."""
    assert model_id("/srv/a/llama-3.gguf") == model_id("models/llama-3.gguf") == "llama-3"
    assert names_of("/srv/a/llama-3.gguf") & names_of("models/llama-3.gguf") == {
        "llama-3.gguf",
        "llama-3",
    }


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("C:\\models\\phi-3.GGUF", "phi-3"),
        ("./relative/mistral.gguf", "mistral"),
        ("/m/big-00001-of-00003.gguf", "big"),
        ("bare-file.gguf", "bare-file"),
    ],
)
def test_windows_relative_and_split_paths_get_a_short_id(path: str, expected: str) -> None:
    """Backslashes, relative paths, upper-case extensions and split models are understood."""
    assert model_id(path) == expected
    assert expected in names_of(path)
    assert path in names_of(path)
