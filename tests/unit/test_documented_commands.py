"""Every shell snippet of the README and the docs runs when pasted: it is valid bash, no comment
hides behind a line continuation, and every ``paddler`` command in it parses as written.

Model paths (``*.gguf``) name files of the reader's machine; they are replaced by a stand-in GGUF
file, the one change made to a command before it is parsed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from paddler.cli import cli
from paddler.cli.launch import checked_llamacpp_args

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(?:bash|shell|sh)\n(.*?)^```", re.M | re.S)


def snippets() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(_BLOCK.finditer(document.read_text()), 1):
            found.append((f"{document.relative_to(ROOT)}#{number}", match.group(1)))
    return found


SNIPPETS = snippets()


def commands(snippet: str) -> list[list[str]]:
    """The ``paddler`` command lines of a snippet, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", snippet)
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]  # VARIABLE=value before the command
        if words and words[0] == "paddler":
            lines.append(words[1:])
    return lines


def test_the_documents_have_snippets() -> None:
    """The README alone has several; an empty list would test nothing."""
    assert sum(1 for name, _ in SNIPPETS if name.startswith("README.md")) >= 5


@pytest.mark.parametrize(("where", "snippet"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_each_snippet_is_valid_bash_without_comments_after_continuations(
    where: str, snippet: str
) -> None:
    """bash -n accepts it, and no "\\ # comment" cuts a command short."""
    result = subprocess.run(["bash", "-n"], input=snippet, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for line in snippet.splitlines():
        assert not re.search(r"\\\s+#", line), line
        assert not line.rstrip().endswith("..."), f"a placeholder, not a command: {line}"


@pytest.mark.parametrize(("where", "snippet"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_each_paddler_command_parses_as_written(
    where: str, snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its subcommand, flags and values are accepted, and its llama.cpp options too."""
    stand_in = tmp_path / "model.gguf"
    stand_in.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setenv("PADDLER_MANAGEMENT_TOKEN", "documented-secret")
    for words in commands(snippet):
        name, *arguments = words
        command = cli.commands[name]  # type: ignore[attr-defined]
        arguments = [str(stand_in) if word.endswith(".gguf") else word for word in arguments]
        context = command.make_context(name, list(arguments))
        trailing = context.params.get("llamacpp_arguments", ())
        inline = context.params.get("llamacpp_args", "")
        if trailing or inline:
            checked_llamacpp_args(inline, trailing)
