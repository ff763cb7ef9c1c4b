"""Text that came from outside (an agent, a client) made safe to log and to show.

An agent's name, a model name, a request path or id can carry a newline that forges a log line,
a terminal escape that rewrites an operator's screen, or a bidirectional override that makes one
name read as another. The unsafe characters are those of the Unicode categories ``Cc``
(controls), ``Cf`` (format), ``Zl``, ``Zp`` (line and paragraph separators), ``Cs``
(surrogates), ``Co`` (private use) and ``Cn`` (unassigned).
"""

from __future__ import annotations

import unicodedata

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def first_unsafe(text: str) -> str | None:
    """The first unsafe character of ``text``, or None if there is none."""
    for char in text:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            return char
    return None


def escape_unprintable(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses written as its Python escape
    (``\\n``, ``\\x1b``, ``\\u202e``): the unsafe ones above, and separators other than the
    space."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
