"""The routing benchmark's three workloads, generated in full from a seed before anything runs.

Every contestant must get the very same requests at the very same moments, so a workload is a
list of ``(arrival offset, request)`` computed up front, and nothing in it depends on what a
server answered: the assistant turns in a chat's history are pre-generated text, not the
model's replies. Arrivals are open-loop Poisson (see ``arrivals``), drawn once and scaled by
the rate, so that the requests (and the shape of their arrival pattern) are the same at every
offered load and only the pace changes.

- ``chat`` (a): ``lanes`` chat sessions at a time, each with its own long system prompt, each
  running ``turns`` turns before a new session (with a new system prompt) takes its lane. Each
  arrival sends the next turn of a lane picked at random among the half of the lanes idle the
  longest: users' think times vary, but none answers twice in a row. The order of the lanes is
  random enough that no proxy gets affinity by accident (a fixed cycle of 16 lanes through
  round robin over 2 or 4 servers would send each lane to the same server every time).
- ``independent`` (b): prompts of random text with no shared prefix: nothing to gain from any
  cache, so routing by prefix must not lose here.
- ``mixed`` (c): short prompts, most asking for a few tokens and some for many, so that a
  server can be stuck with long generations: routing must still look at load.

Text is random lowercase "words": with the tiny model's byte-level tokenizer one character is
about one token.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

WORKLOADS = ("chat", "independent", "mixed")

TEMPLATE_TOKENS_PER_MESSAGE = 32
"""ChatML wraps each message in ``<|im_start|>role\\n ... <|im_end|>\\n``; the tiny model has
no special tokens for those, so they cost about this many byte tokens each."""


@dataclass(frozen=True)
class ChatShape:
    """Workload (a): the chat sessions."""

    lanes: int = 16
    turns: int = 6
    system_chars: tuple[int, int] = (1400, 1600)
    user_chars: tuple[int, int] = (100, 200)
    assistant_chars: tuple[int, int] = (80, 120)
    max_tokens: int = 24

    @property
    def context_needed(self) -> int:
        """Tokens of context the last turn of a session may need at most, answer included."""
        turns = self.turns * (self.user_chars[1] + TEMPLATE_TOKENS_PER_MESSAGE)
        replies = (self.turns - 1) * (self.assistant_chars[1] + TEMPLATE_TOKENS_PER_MESSAGE)
        system = self.system_chars[1] + TEMPLATE_TOKENS_PER_MESSAGE
        return system + turns + replies + TEMPLATE_TOKENS_PER_MESSAGE + self.max_tokens


@dataclass(frozen=True)
class IndependentShape:
    """Workload (b): prompts that share nothing."""

    chars: tuple[int, int] = (300, 1800)
    max_tokens: int = 24

    @property
    def context_needed(self) -> int:
        return self.chars[1] + 2 * TEMPLATE_TOKENS_PER_MESSAGE + self.max_tokens


@dataclass(frozen=True)
class MixedShape:
    """Workload (c): short prompts, short and long generations."""

    chars: tuple[int, int] = (100, 300)
    short_tokens: int = 16
    long_tokens: int = 256
    long_share: float = 0.2

    @property
    def context_needed(self) -> int:
        return self.chars[1] + 2 * TEMPLATE_TOKENS_PER_MESSAGE + self.long_tokens


@dataclass(frozen=True)
class ChatRequest:
    """One request of a workload; ``at`` is its send time in seconds after the run starts."""

    at: float
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    session: int | None = None
    """Workload (a): which chat session this turn belongs to (numbered from 0)."""

    def body(self) -> bytes:
        return json.dumps(
            {
                "messages": list(self.messages),
                "max_tokens": self.max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
        ).encode()

    @property
    def prompt_tokens_estimate(self) -> int:
        """About the prompt's tokens (one per character), template included."""
        return (
            sum(len(message["content"]) + TEMPLATE_TOKENS_PER_MESSAGE for message in self.messages)
            + TEMPLATE_TOKENS_PER_MESSAGE
        )


def arrivals(seed: int, workload: str, count: int, rate: float) -> list[float]:
    """``count`` Poisson arrival offsets at ``rate`` per second, within ``count / rate`` s.

    Given how many arrivals fall in a window, a Poisson process places them independently and
    uniformly in it: drawing them so keeps the gaps exponential while the offered load is
    exactly ``rate`` (a sum of drawn gaps would stray by about ``1 / sqrt(count)``). The same
    seed and workload give the same pattern at every rate, only scaled.
    """
    rng = random.Random(f"{seed}:{workload}:arrivals")
    return sorted(rng.random() * count / rate for _ in range(count))


def generate(
    workload: str,
    seed: int,
    count: int,
    rate: float,
    chat: ChatShape = ChatShape(),
    independent: IndependentShape = IndependentShape(),
    mixed: MixedShape = MixedShape(),
) -> list[ChatRequest]:
    """The ``count`` requests of ``workload`` at ``rate`` requests per second."""
    rng = random.Random(f"{seed}:{workload}:requests")
    times = arrivals(seed, workload, count, rate)
    if workload == "chat":
        return chat_requests(rng, times, chat)
    if workload == "independent":
        return [
            ChatRequest(at, (_user(_text(rng, independent.chars)),), independent.max_tokens)
            for at in times
        ]
    if workload == "mixed":
        return [
            ChatRequest(
                at,
                (_user(_text(rng, mixed.chars)),),
                mixed.long_tokens if rng.random() < mixed.long_share else mixed.short_tokens,
            )
            for at in times
        ]
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


def chat_requests(rng: random.Random, times: list[float], shape: ChatShape) -> list[ChatRequest]:
    """Workload (a): each arrival takes the next turn of a lane among the longest idle half."""
    sessions = 0

    def new_session() -> _Session:
        nonlocal sessions
        sessions += 1
        return _Session(sessions - 1, [_system(_text(rng, shape.system_chars))])

    lanes = [new_session() for _ in range(shape.lanes)]
    # "Idle the longest" counts arrivals since the lane's last turn; at first, lanes rank in
    # reverse order of their numbers, as if each had been used once.
    last_used = [-1 - lane for lane in range(shape.lanes)]
    requests = []
    for index, at in enumerate(times):
        idlest = sorted(range(shape.lanes), key=lambda lane: last_used[lane])[
            : max(1, shape.lanes // 2)
        ]
        lane = rng.choice(idlest)
        last_used[lane] = index
        session = lanes[lane]
        session.messages.append(_user(_text(rng, shape.user_chars)))
        requests.append(ChatRequest(at, tuple(session.messages), shape.max_tokens, session.number))
        session.messages.append(_assistant(_text(rng, shape.assistant_chars)))
        session.turns += 1
        if session.turns == shape.turns:
            lanes[lane] = new_session()
    return requests


@dataclass
class _Session:
    number: int
    messages: list[dict[str, str]]
    turns: int = 0


def _text(rng: random.Random, chars: tuple[int, int]) -> str:
    """Random words of lowercase letters, ``chars`` long (bounds included)."""
    length = rng.randint(*chars)
    words: list[str] = []
    size = 0
    while size < length:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def _system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def describe(
    workload: str, chat: ChatShape, independent: IndependentShape, mixed: MixedShape
) -> str:
    """One sentence for the report."""
    if workload == "chat":
        return (
            f"(a) multi-turn chat: {chat.lanes} lanes, each a session of {chat.turns} turns "
            f"with its own system prompt of {chat.system_chars[0]}-{chat.system_chars[1]} "
            f"characters, user turns of {chat.user_chars[0]}-{chat.user_chars[1]}, synthetic "
            f"assistant turns of {chat.assistant_chars[0]}-{chat.assistant_chars[1]}; "
            f"max_tokens {chat.max_tokens}"
        )
    if workload == "independent":
        return (
            f"(b) independent prompts: {independent.chars[0]}-{independent.chars[1]} random "
            f"characters, no shared prefix; max_tokens {independent.max_tokens}"
        )
    return (
        f"(c) short and long generations: prompts of {mixed.chars[0]}-{mixed.chars[1]} "
        f"characters; max_tokens {mixed.short_tokens} ({1 - mixed.long_share:.0%}) or "
        f"{mixed.long_tokens} ({mixed.long_share:.0%})"
    )
