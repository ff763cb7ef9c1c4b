"""Every shell snippet of the README and the docs runs when pasted: it is valid bash, no comment
hides behind a line continuation, and every ``paddler`` command in it parses as written.

Model paths (``*.gguf``) name files of the reader's machine; they are replaced by a stand-in GGUF
file, the one change made to a command before it is parsed.

Snippets made only of file-making commands (``openssl``, ``printf``, ``chmod``: the test CA,
certificate and keys file of docs/security.md) are run for real, in order, in one directory, and
the ``paddler`` commands are parsed there, so that the files they name exist as they would for
the reader.
"""

from __future__ import annotations

import re
import shlex
import ssl
import subprocess
from pathlib import Path

import pytest

from paddler.cli import cli
from paddler.cli.launch import checked_llamacpp_args
from paddler.tls import client_context, server_context

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


def command_lines(snippet: str) -> list[list[str]]:
    """Every command line of a snippet as words, continuation lines joined, without the
    ``VARIABLE=value`` assignments before a command."""
    joined = re.sub(r"\\\n", " ", snippet)
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            lines.append(words)
    return lines


def commands(snippet: str) -> list[list[str]]:
    """The ``paddler`` command lines of a snippet, continuation lines joined."""
    return [words[1:] for words in command_lines(snippet) if words[0] == "paddler"]


_FILE_MAKERS = {"openssl", "printf", "chmod"}
FILE_SNIPPETS = [
    (where, snippet)
    for where, snippet in SNIPPETS
    if command_lines(snippet) and all(words[0] in _FILE_MAKERS for words in command_lines(snippet))
]


@pytest.fixture(scope="module")
def documented_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where every file-making snippet has run, in the documents' order."""
    directory = tmp_path_factory.mktemp("documented")
    for where, snippet in FILE_SNIPPETS:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", snippet],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{where}: {result.stderr}"
    return directory


def test_the_documented_openssl_commands_make_a_certificate_that_a_strict_client_trusts(
    documented_files: Path,
) -> None:
    """docs/security.md's CA signs a certificate that the balancer loads and that a client
    verifying against ca.pem accepts, for localhost and 127.0.0.1, even with the strict
    checks of newer Pythons (VERIFY_X509_STRICT)."""
    assert any(where.startswith("docs/security.md") for where, _ in FILE_SNIPPETS)
    server = server_context(
        documented_files / "server.pem", documented_files / "server.key", flags="--test"
    )
    client = client_context(documented_files / "ca.pem")
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    for host in ("localhost", "127.0.0.1"):
        assert _handshake(server, client, host) is not None
    keys = (documented_files / "keys.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in keys] == ["alice", "bob"]


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> str | None:
    """A TLS handshake in memory; the protocol version agreed, or an ssl error raised."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=host)
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return client_side.version()
    raise AssertionError("the handshake did not finish")


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
    where: str,
    snippet: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    documented_files: Path,
) -> None:
    """Its subcommand, flags and values are accepted, and its llama.cpp options too."""
    monkeypatch.chdir(documented_files)
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
