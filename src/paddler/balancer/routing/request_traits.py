"""What routing reads from a request: the model it names and the text its prompt starts with.

The body is parsed once, here, and only when routing can use it. Nothing is validated: a body
that is not JSON, or a field of an unexpected type, simply yields no model and no prompt, and the
request goes on to llama.cpp, which answers with its own error. The balancer stays invisible.

The *prompt text* is a stand-in for the tokens llama.cpp will cache, in the order the chat
template lays them out: tools first, then each message's role and content. Two requests whose
prompt texts share a prefix share (up to the template's own tokens) a token prefix, which is all
the prefix index needs; it never has to reproduce the template or the tokenizer. Only its first
``prefix_index.PROMPT_CHARS`` characters are kept (the index reads no further), with the whole
text's length beside them, so that a huge prompt costs routing no more than a long one.

``inspect`` is plain, synchronous work, proportional to the body: ``traits_reader`` decides
whether it runs on the event loop or in a worker process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from paddler.balancer.routing.prefix_index import PROMPT_CHARS

# Separators that cannot be confused with text: a prompt that ends where another's role begins
# must not look like a shared prefix.
_FIELD = "\x1f"
_RECORD = "\x1e"

_CHAT_PATHS = frozenset({"/chat/completions", "/v1/chat/completions"})
_COMPLETION_PATHS = frozenset({"/completion", "/completions", "/v1/completions"})
_RESPONSES_PATHS = frozenset({"/responses", "/v1/responses"})
_MESSAGES_PATHS = frozenset({"/v1/messages"})


@dataclass(frozen=True, slots=True)
class RequestTraits:
    model: str | None = None
    prompt: str | None = None
    """The start of the prompt text: at most ``PROMPT_CHARS`` characters."""
    prompt_chars: int = 0
    """The length of the whole prompt text."""


NO_TRAITS = RequestTraits()


def inspect(
    method: str, path: str, query: Mapping[str, str], body: bytes, prompts: bool = True
) -> RequestTraits:
    """The model (from a JSON body, or ``?model=`` for other requests) and the prompt text;
    without ``prompts``, the model alone (no routing policy but the prefix one reads prompts)."""
    if method != "POST" or not body:
        model = query.get("model")
        return RequestTraits(model=model or None)
    try:
        document = _parsed(body)
        if not isinstance(document, dict):
            return NO_TRAITS
        model = document.get("model")
        if not isinstance(model, str) or not model:
            model = query.get("model") or None
        if not prompts:
            return NO_TRAITS if model is None else RequestTraits(model=model)
        prompt = _prompt_text(path.rstrip("/"), document)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a body nested deeper than the parser goes (about a thousand levels).
        return NO_TRAITS
    if prompt is None:
        return RequestTraits(model=model)
    return RequestTraits(model=model, prompt=prompt[:PROMPT_CHARS], prompt_chars=len(prompt))


_DECODER = json.JSONDecoder()
_LONG_NUMBER = re.compile(rb"[0-9]{20}")
"""Twenty digits in a row: perhaps an integer beyond 64 bits, which ``orjson`` would read as a
float where ``json`` keeps it an integer."""


def _parsed(body: bytes) -> object:
    """``json.loads(body)``, exactly (the same document, or a ``ValueError``).

    ``orjson`` reads a small body in a tenth of the time (0.2-0.4 µs for a 34-byte one, where
    ``json`` takes 2-3.5 µs, which was 2% of a small request's CPU); what it refuses and
    ``json`` accepts (a byte-order mark, NaN, a lone surrogate, a number beyond a double)
    goes to ``json`` itself, and so does a body with twenty digits in a row, the one thing it
    reads differently. For ``json``: a body that starts with ``{`` and a byte that is not NUL
    is UTF-8 (``json.detect_encoding``'s rule: no BOM starts with ``{``), and is read by the
    decoder at once; ``json.loads`` spends more on finding the encoding and on its general
    case than on a small body's parse (19 k instructions for a 32-byte body, 8 k this way)."""
    if _LONG_NUMBER.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # refused: json has the last word
    if body[:1] != b"{" or len(body) < 4 or not body[1]:
        return json.loads(body)
    text = body.decode("utf-8", "surrogatepass")
    document, end = _DECODER.raw_decode(text)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON document")
    return document


def _prompt_text(path: str, document: dict[str, Any]) -> str | None:
    parts: list[str] = []
    if path in _CHAT_PATHS:
        _add_tools(parts, document)
        _add_messages(parts, document.get("messages"))
    elif path in _MESSAGES_PATHS:
        _add_tools(parts, document)
        system = document.get("system")
        if system is not None:
            parts.append(f"system{_FIELD}{_content_text(system)}{_RECORD}")
        _add_messages(parts, document.get("messages"))
    elif path in _RESPONSES_PATHS:
        _add_tools(parts, document)
        instructions = document.get("instructions")
        if isinstance(instructions, str):
            parts.append(f"system{_FIELD}{instructions}{_RECORD}")
        prompt = document.get("input")
        if isinstance(prompt, str):
            parts.append(f"user{_FIELD}{prompt}{_RECORD}")
        else:
            _add_messages(parts, prompt)
    elif path in _COMPLETION_PATHS:
        prompt = document.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            parts.append(prompt)
        elif isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
            # Token ids, each ended by a space: their text form shares prefixes exactly as the
            # ids do ("1 2 " is not a prefix of "1 23 ").
            parts.append("".join(f"{token} " for token in prompt))
    text = "".join(parts)
    return text or None


def _add_tools(parts: list[str], document: dict[str, Any]) -> None:
    tools = document.get("tools")
    if tools:
        parts.append(f"tools{_FIELD}{json.dumps(tools, sort_keys=True)}{_RECORD}")


def _add_messages(parts: list[str], messages: object) -> None:
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        parts.append(
            f"{role if isinstance(role, str) else ''}{_FIELD}"
            f"{_content_text(message.get('content'))}{_RECORD}"
        )


def _content_text(content: object) -> str:
    """A message's content as text: a string, or the parts of a multi-part content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                # Images and audio: their JSON stands for them (same data, same prefix).
                texts.append(text if isinstance(text, str) else json.dumps(part, sort_keys=True))
            elif isinstance(part, str):
                texts.append(part)
        return _FIELD.join(texts)
    if content is None:
        return ""
    return json.dumps(content, sort_keys=True)
