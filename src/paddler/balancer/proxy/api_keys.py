"""The client API keys the proxy port accepts, and the constant-time check of a presented key.

Keys come from ``--api-key`` (or ``PADDLER_API_KEYS``, comma-separated) and from
``--api-keys-file``. The file holds one key per line; blank lines and ``#`` comments are
ignored, and a line ``NAME: KEY`` (a space after the colon) names its key; an unnamed key there
may not contain ``:``, so that no line is ambiguous. ``reload()`` re-reads the file (the CLI calls it
on SIGHUP); a file that cannot be read or parsed then keeps the keys already loaded.

Each key has an id that may be logged and traced, never the key itself: its name, or else the
first 8 hex digits of its SHA-256. A short hash of a long random key reveals nothing useful; a
key that might be guessed (a word) should be named, so that not even its hash is logged.

The check hashes the presented key and compares that digest with every key's digest with
``hmac.compare_digest``, without stopping at a match: its time depends on neither the presented
key nor on which key matched, only on how many keys there are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.@-]{1,64}):\s+(?P<key>\S+)$")
_KEY = re.compile(r"^\S+$")


class ApiKeyError(ValueError):
    """A key, or the keys file, is unusable; the message says where and why, without the key."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_id(key: str) -> str:
    """The id of an unnamed key: the first 8 hex digits of its SHA-256."""
    return _digest(key).hex()[:8]


def checked_key(key: str, where: str) -> str:
    """``key`` if it is usable (not empty, no whitespace); ApiKeyError otherwise."""
    if not _KEY.match(key):
        raise ApiKeyError(f"{where}: an API key must be non-empty and contain no whitespace")
    return key


def parse_keys_file(text: str, source: str) -> list[ApiKey]:
    """The keys of a keys file's text; ApiKeyError naming ``source`` and the line if malformed."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        named = _NAMED.match(line)
        where = f"{source} line {number}"
        if named is not None:
            key = named["key"]
            keys.append(ApiKey(named["name"], _digest(key)))
        elif ":" in line:
            # "alice:sk-1" could be a named key or a key with a colon: refuse to guess.
            raise ApiKeyError(
                f"{where}: name a key as 'NAME: KEY' (a space after the colon); a key in "
                "this file may not contain ':' otherwise"
            )
        else:
            key = checked_key(line, where)
            keys.append(ApiKey(key_id(key), _digest(key)))
    return keys


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents, read as llama.cpp reads it (measured on its build b11434).

    ``Authorization`` wins when present: its value without a ``Bearer `` prefix (case-sensitive),
    else the value whole. ``X-Api-Key`` counts only when there is no ``Authorization``.
    """
    authorization = headers.get("Authorization", "")
    if authorization:
        return authorization.removeprefix("Bearer ")
    return headers.get("X-Api-Key") or None


class ApiKeys:
    """The accepted keys: the fixed ones given on the command line, plus those of the file.

    ``enabled`` once any key, or a file, is configured: with a file of no keys every request is
    refused, rather than every request let in.
    """

    def __init__(self, keys: Iterable[str] = (), file: Path | None = None) -> None:
        self._fixed = [ApiKey(key_id(key), _digest(checked_key(key, "--api-key"))) for key in keys]
        self._file = file
        self._keys: tuple[ApiKey, ...] = ()
        self._install(self._read_file() if file is not None else [])

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._file is not None

    @property
    def ids(self) -> list[str]:
        return [key.id for key in self._keys]

    def check(self, presented: str | None) -> str | None:
        """The id of the key ``presented`` is, or None; in constant time (see the module)."""
        if presented is None:
            return None
        digest = _digest(presented)
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.id  # no break: every key is compared, whichever matches
        return found

    def reload(self) -> bool:
        """Re-read the keys file; on any error keep the keys already loaded and log why."""
        if self._file is None:
            log.info("no --api-keys-file to re-read; the API keys stay as they are")
            return False
        before = set(self.ids)
        try:
            from_file = self._read_file()
            self._install(from_file)
        except ApiKeyError as error:
            log.error("%s; keeping the %d API key(s) already loaded", error, len(self._keys))
            return False
        after = set(self.ids)
        log.info(
            "re-read %s: %d API key(s); added %s; removed %s",
            self._file,
            len(self._keys),
            ", ".join(sorted(after - before)) or "none",
            ", ".join(sorted(before - after)) or "none",
        )
        return True

    def _read_file(self) -> list[ApiKey]:
        assert self._file is not None
        try:
            text = self._file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = (error.strerror or str(error)) if isinstance(error, OSError) else "not UTF-8"
            raise ApiKeyError(f"cannot read --api-keys-file {self._file}: {reason}") from None
        return parse_keys_file(text, str(self._file))

    def _install(self, from_file: list[ApiKey]) -> None:
        keys = (*self._fixed, *from_file)
        seen_ids: set[str] = set()
        seen_digests: set[bytes] = set()
        for key in keys:
            if key.digest in seen_digests:
                raise ApiKeyError(f"the API key with id {key.id} is given twice")
            if key.id in seen_ids:
                raise ApiKeyError(f"two API keys have the id {key.id}; name them apart")
            seen_ids.add(key.id)
            seen_digests.add(key.digest)
        self._keys = keys
        if self.enabled and not keys:
            log.warning("the API key set is empty: every request on the proxy port gets 401")
