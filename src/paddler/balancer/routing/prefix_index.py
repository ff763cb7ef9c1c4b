"""An approximate, bounded index of which prompt prefixes each llama.cpp server recently processed.

A prompt is cut into blocks of ``BLOCK_CHARS`` characters and the *chain* of its prefix hashes is
computed: hash ``i`` stands for the prompt's first ``(i + 1) * BLOCK_CHARS`` characters. The index
maps each prefix hash to the servers that processed a prompt starting with it, so the length of
the prompt a server probably holds is the number of leading hashes of the chain it owns. This is
the hashed-block form of a radix tree: no tokenizer, no template, constant memory per block.

Servers are named by *cache keys*: the pool gives each agent a new key whenever its llama.cpp may
have lost its cache (a new registration, a restart), so that stale ownerships simply never match
again and age out.

Bounded memory: every block and every ownership is counted at an estimated cost (measured with
``tracemalloc``, see the tests), and recording a prompt evicts the least recently used blocks
while the estimate exceeds the limit. A block keeps at most ``MAX_OWNERS`` owners.

What the index cannot see is llama.cpp's own eviction. So it learns it: each ownership is stamped
with the number of prompt characters routed to that server so far, and the *age* of an ownership
is how many characters were routed there since. Every response reports how much of its prompt
llama.cpp found in cache (``timings.cache_n``); comparing that with the ages of the blocks the
index thought were there brackets the server's *retention*: blocks younger than a confirmed hit
are kept, a block older than a confirmed miss is gone. Ownerships older than the learned
retention no longer count as matches.

Hand-written: no maintained Python library offers a bounded prefix-ownership map with per-owner
ages; the structure is an ``OrderedDict`` used as an LRU, as ``functools.lru_cache`` does.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

BLOCK_CHARS = 128
"""Characters per block: about 32 tokens of a typical tokenizer, and 128 of a byte tokenizer."""

MAX_BLOCKS = 2048
"""Longest chain kept: the first 256 KiB characters of a prompt are plenty to tell prefixes apart."""

PROMPT_CHARS = MAX_BLOCKS * BLOCK_CHARS
"""The most of a prompt the index ever reads: text past it changes no hash."""

MAX_OWNERS = 8

ENTRY_BYTES = 320
"""Estimated bytes per block: the hash, its ``OrderedDict`` node and its owners dict."""

OWNER_BYTES = 20
"""Estimated bytes per ownership: a slot in the owners dict (the stamp is shared by a chain)."""


def prefix_chain(prompt: str) -> tuple[int, ...]:
    """The prefix hashes of ``prompt``'s whole blocks (a shorter tail is not indexed)."""
    hasher = hashlib.blake2b(digest_size=8)
    chain = []
    whole = min(len(prompt) // BLOCK_CHARS, MAX_BLOCKS)
    for index in range(whole):
        block = prompt[index * BLOCK_CHARS : (index + 1) * BLOCK_CHARS]
        hasher.update(block.encode("utf-8", "surrogatepass"))
        # digest() does not finalize: the hasher goes on, so each digest covers the whole prefix.
        chain.append(int.from_bytes(hasher.digest(), "little"))
    return tuple(chain)


@dataclass(frozen=True)
class Match:
    """What the index knows of one server for one prompt."""

    blocks: int
    """Leading blocks the server probably still holds (within its learned retention)."""
    ages: tuple[int, ...]
    """Ages of the leading blocks it was sent, regardless of retention (for learning)."""

    @property
    def chars(self) -> int:
        return self.blocks * BLOCK_CHARS


NO_MATCH = Match(0, ())


class PrefixIndex:
    def __init__(self, memory_limit: int) -> None:
        self._limit = memory_limit
        self._blocks: OrderedDict[int, dict[int, int]] = OrderedDict()
        self._owners = 0
        self._routed: dict[int, int] = {}
        self._retention: dict[int, float] = {}
        self._kept: dict[int, int] = {}
        self.evictions = 0
        self.version = 0
        """Changes whenever a ``match`` might answer differently."""

    # -- size -------------------------------------------------------------------------------

    @property
    def memory_limit(self) -> int:
        return self._limit

    @property
    def memory_bytes(self) -> int:
        """Estimated bytes held; never above ``memory_limit`` after a ``record``."""
        return len(self._blocks) * ENTRY_BYTES + self._owners * OWNER_BYTES

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def routed(self, key: int) -> int:
        """Prompt characters recorded for the server ``key`` so far."""
        return self._routed.get(key, 0)

    def retention(self, key: int) -> float:
        """Learned characters a server keeps in cache (``inf`` until a miss was seen)."""
        return self._retention.get(key, math.inf)

    # -- use --------------------------------------------------------------------------------

    def owners(self, chain: tuple[int, ...]) -> tuple[int, ...]:
        """The servers that were sent the chain's first block (at most ``MAX_OWNERS``): the only
        ones a ``match`` can find anything on."""
        owners = self._blocks.get(chain[0]) if chain else None
        return tuple(owners) if owners else ()

    def match(self, chain: tuple[int, ...], keys: Iterable[int]) -> dict[int, Match]:
        """For each cache key, how much of the chain that server probably holds."""
        ages: dict[int, list[int]] = {key: [] for key in keys if key in self._routed}
        usable = dict.fromkeys(ages, 0)
        following = set(ages)
        for prefix in chain:
            owners = self._blocks.get(prefix)
            if owners is None:
                break
            for key in list(following):
                stamp = owners.get(key)
                if stamp is None:
                    following.discard(key)
                    continue
                age = self._routed[key] - stamp
                ages[key].append(age)
                if usable[key] == len(ages[key]) - 1 and age <= self.retention(key):
                    usable[key] += 1
            if not following:
                break
        return {key: Match(usable[key], tuple(ages[key])) for key in ages}

    def record(self, key: int, chain: tuple[int, ...], chars: int) -> None:
        """``chars`` characters of a prompt with this chain were sent to the server ``key``."""
        self.version += 1
        stamp = self._routed.get(key, 0) + chars
        self._routed[key] = stamp
        # Deepest block first, so that a chain's root is the most recently used of its blocks
        # and the last to be evicted: a chain that lost its root can never match again.
        for prefix in reversed(chain):
            owners = self._blocks.get(prefix)
            if owners is None:
                owners = self._blocks[prefix] = {}
            else:
                self._blocks.move_to_end(prefix)
                if owners.pop(key, None) is not None:
                    self._owners -= 1
                elif len(owners) >= MAX_OWNERS:
                    del owners[next(iter(owners))]
                    self._owners -= 1
            owners[key] = stamp
            self._owners += 1
        while self._blocks and self.memory_bytes > self._limit:
            _, owners = self._blocks.popitem(last=False)
            self._owners -= len(owners)
            self.evictions += 1

    def learn(self, key: int, match: Match, cached_chars: int) -> None:
        """llama.cpp found ``cached_chars`` of a prompt in cache where the index said ``match``.

        Blocks it still had show that the server keeps at least that much; the first block it
        no longer had, if it is older than anything seen kept, shows that it keeps less. A miss
        on a block younger than one seen kept is not an eviction (llama.cpp's cache evicts by
        age): the request took another slot, for example, and nothing is learned from it.
        """
        if key not in self._routed or not match.ages:
            return
        self.version += 1
        kept = min(cached_chars // BLOCK_CHARS, len(match.ages))
        seen_kept = max(self._kept.get(key, -1), max(match.ages[:kept], default=-1))
        self._kept[key] = seen_kept
        retention = max(self.retention(key), seen_kept)
        # One block of slack: the chat template's tokens and llama.cpp re-evaluating the last
        # prompt token make the cached count fall a little short of a full match.
        if kept + 1 < len(match.ages):
            lost = match.ages[kept + 1]
            if lost > seen_kept:
                retention = min(retention, lost - 1)
        self._retention[key] = retention

    def forget(self, key: int) -> None:
        """The server's cache is gone; its ownerships no longer match and age out."""
        self.version += 1
        self._routed.pop(key, None)
        self._retention.pop(key, None)
        self._kept.pop(key, None)
