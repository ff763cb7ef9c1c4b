"""Client API keys: the file's syntax, the ids, the headers read, and the constant-time check."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from paddler.balancer.observability.observers import Outcome, RequestRecord
from paddler.balancer.observability.request_log import RequestLog
from paddler.balancer.proxy.api_keys import (
    ApiKeyError,
    ApiKeys,
    key_id,
    parse_keys_file,
    presented_key,
)
from paddler.cli import cli
from tests.support.logs import watching

KEYS_FILE = """\
# the team's keys
alice: sk-alice-0001

sk-anonymous-0002
   # indented comment
bob.smith:   sk-bob-0003
"""


def test_a_keys_file_has_one_key_a_line_with_comments_blanks_and_names() -> None:
    """Blank lines and # comments are skipped; NAME: KEY names a key, a bare key gets its hash."""
    keys = parse_keys_file(KEYS_FILE, "keys.txt")
    assert [key.id for key in keys] == ["alice", key_id("sk-anonymous-0002"), "bob.smith"]


def test_an_unnamed_keys_id_is_the_start_of_its_sha256() -> None:
    """Eight hex digits: enough to tell keys apart in a log, too few to be the key."""
    assert key_id("sk-anonymous-0002") == hashlib.sha256(b"sk-anonymous-0002").hexdigest()[:8]


def test_a_malformed_line_is_named_without_repeating_the_key() -> None:
    """A line with a space inside the key is refused, by file and line number."""
    with pytest.raises(ApiKeyError) as refused:
        parse_keys_file("good-key\nbad key here\n", "keys.txt")
    assert "keys.txt line 2" in str(refused.value)
    assert "bad key" not in str(refused.value)


def test_a_colon_without_a_space_is_refused_as_ambiguous() -> None:
    """ "alice:sk-1" might be a name and a key, or one key: the file says which, or is refused."""
    with pytest.raises(ApiKeyError, match="line 1: name a key as 'NAME: KEY'"):
        parse_keys_file("alice:sk-1\n", "keys.txt")


def test_the_same_key_twice_is_refused() -> None:
    """Two lines with one key would give one key two ids."""
    with pytest.raises(ApiKeyError, match="given twice"):
        ApiKeys(["sk-1", "sk-1"])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "sk-1"}, "sk-1"),  # llama.cpp takes a bare value too
        ({"X-Api-Key": "sk-1"}, "sk-1"),
        ({"Authorization": "Bearer wrong", "X-Api-Key": "sk-1"}, "wrong"),
        ({}, None),
    ],
)
def test_the_key_is_read_from_authorization_else_x_api_key_as_llamacpp_reads_it(
    headers: dict[str, str], expected: str | None
) -> None:
    """Authorization wins when present, with or without Bearer; X-Api-Key counts without it."""
    assert presented_key(headers) == expected


def test_the_check_accepts_a_key_from_either_header_and_returns_its_id() -> None:
    """Both ways of presenting a key reach the same check."""
    keys = ApiKeys(["sk-flag"])
    assert keys.check(presented_key({"Authorization": "Bearer sk-flag"})) == key_id("sk-flag")
    assert keys.check(presented_key({"X-Api-Key": "sk-flag"})) == key_id("sk-flag")
    assert keys.check(presented_key({"X-Api-Key": "sk-fla"})) is None
    assert keys.check(presented_key({})) is None


def test_the_check_compares_every_key_in_fixed_length_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A match on the first key still compares all of them, always 32-byte digests, so the
    time taken tells nothing about which key matched or how much of it was right."""
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys([f"sk-{index}" for index in range(5)])
    assert keys.check("sk-0") == key_id("sk-0")
    assert keys.check("x") is None
    assert compared == [(32, 32)] * 10


def test_api_keys_come_from_a_repeatable_flag_or_a_comma_separated_variable() -> None:
    """--api-key may be given twice; PADDLER_API_KEYS takes several between commas."""
    command = cli.commands["balancer"]
    flags = command.make_context("balancer", ["--api-key", "sk-a", "--api-key", "sk-b"])
    assert flags.params["api_keys"] == ("sk-a", "sk-b")
    runner = CliRunner(env={"PADDLER_API_KEYS": " sk-a, sk-b,,sk-c "})
    with runner.isolation():
        context = command.make_context("balancer", [])
    assert context.params["api_keys"] == ("sk-a", "sk-b", "sk-c")


def test_a_reload_takes_the_new_file_and_a_bad_one_keeps_the_old_keys(tmp_path: Path) -> None:
    """A removed key stops working and a new one starts; an unreadable or malformed file
    changes nothing and says why; the keys given as flags stay throughout."""
    path = tmp_path / "keys.txt"
    path.write_text("old: sk-old\n")
    keys = ApiKeys(["sk-flag"], path)
    path.write_text("new: sk-new\n")
    assert keys.reload()
    assert (keys.check("sk-old"), keys.check("sk-new")) == (None, "new")
    path.write_text("new: sk-new\nbroken line\n")
    with watching("paddler.balancer.proxy.api_keys") as log:
        assert not keys.reload()
        path.unlink()
        assert not keys.reload()
    errors = log.messages(logging.ERROR)
    assert "line 2" in errors[0] and "keeping the 2 API key(s)" in errors[0]
    assert "No such file" in errors[1]
    assert keys.check("sk-new") == "new" and keys.check("sk-flag") == key_id("sk-flag")


def test_an_empty_keys_file_refuses_everybody(tmp_path: Path) -> None:
    """A file with no key keeps client keys on: nobody gets in, rather than everybody."""
    path = tmp_path / "keys.txt"
    path.write_text("# all revoked\n")
    keys = ApiKeys([], path)
    assert keys.enabled and keys.check("") is None
    assert not ApiKeys([], None).enabled


def test_the_request_log_line_names_the_key_id_and_never_the_key() -> None:
    """The text and the structured fields both carry ``key_id``."""
    record = RequestRecord(
        id="r1",
        method="POST",
        path="/v1/chat/completions",
        route="/v1/chat/completions",
        needs_slot=True,
        key_id="alice",
    )
    record.outcome, record.status, record.ended = Outcome.COMPLETED, 200, record.started
    with watching("paddler.requests") as log:
        RequestLog().request_finished(record)
    (entry,) = log.records
    assert entry.__dict__["key_id"] == "alice"
    assert entry.getMessage().endswith("0 attempt(s), key alice)")
