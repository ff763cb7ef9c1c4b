"""Prefix index: hashed prompt-prefix chains, per-server ownership, bounded memory, learned retention."""

from __future__ import annotations

import gc
import math
import random
import string
import tracemalloc

from paddler.balancer.routing.prefix_index import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    MAX_OWNERS,
    NO_MATCH,
    PrefixIndex,
    prefix_chain,
)

UNLIMITED = 10**12


def text(blocks: float, seed: object) -> str:
    """``blocks`` blocks of random letters, the same for the same seed."""
    rng = random.Random(str(seed))
    return "".join(rng.choices(string.ascii_letters, k=int(blocks * BLOCK_CHARS)))


def chain_of(blocks: float, seed: object) -> tuple[int, ...]:
    return prefix_chain(text(blocks, seed))


def cost(*records: tuple[int, tuple[int, ...]]) -> int:
    """The index's own estimate for holding exactly these recordings."""
    index = PrefixIndex(UNLIMITED)
    for key, chain in records:
        index.record(key, chain, len(chain) * BLOCK_CHARS)
    return index.memory_bytes


# -- prefix_chain ---------------------------------------------------------------------------------


def test_prefix_chain_covers_whole_blocks_only() -> None:
    """A block's worth of characters makes one hash; a shorter tail makes none."""
    assert prefix_chain("") == ()
    assert prefix_chain("x" * (BLOCK_CHARS - 1)) == ()
    assert len(prefix_chain("x" * BLOCK_CHARS)) == 1
    prompt = text(3.99, "whole")
    assert len(prefix_chain(prompt)) == 3
    assert prefix_chain(prompt) == prefix_chain(prompt[: 3 * BLOCK_CHARS])


def test_prefix_chain_is_stable_across_calls() -> None:
    """The same text, even as a different string object, always gives the same chain."""
    prompt = text(5, "stable")
    copy = "".join(list(prompt))
    assert copy is not prompt
    assert prefix_chain(prompt) == prefix_chain(prompt) == prefix_chain(copy)


def test_a_shared_prefix_gives_shared_leading_hashes_and_diverges_after() -> None:
    """Prompts equal for 2.5 blocks share two hashes and differ in every later one."""
    common = text(2.5, "common")
    first = prefix_chain(common + text(4, "first"))
    second = prefix_chain(common + text(4, "second"))
    assert first[:2] == second[:2]
    assert all(a != b for a, b in zip(first[2:], second[2:], strict=True))


def test_each_hash_stands_for_the_whole_prefix() -> None:
    """A block equal to another's at the same position, after different prefixes, hashes apart."""
    block = text(1, "block")
    first = prefix_chain(text(1, "a") + block)
    second = prefix_chain(text(1, "b") + block)
    assert first[1] != second[1]
    assert len(set(prefix_chain(block * 4))) == 4


def test_prefix_chain_is_capped_at_max_blocks() -> None:
    """Very long prompts index only their first ``MAX_BLOCKS`` blocks."""
    prompt = "y" * ((MAX_BLOCKS + 3) * BLOCK_CHARS)
    chain = prefix_chain(prompt)
    assert len(chain) == MAX_BLOCKS
    assert chain == prefix_chain(prompt[: MAX_BLOCKS * BLOCK_CHARS])


def test_prefix_chain_accepts_lone_surrogates() -> None:
    """JSON may decode to lone surrogates; they hash instead of raising."""
    assert len(prefix_chain("\ud800" * BLOCK_CHARS * 2)) == 2


# -- match and record -----------------------------------------------------------------------------


def test_a_recorded_chain_matches_fully_for_its_key_only() -> None:
    """The server that was sent a prompt owns all of it; another server owns none."""
    index = PrefixIndex(UNLIMITED)
    chain = chain_of(6, "prompt")
    index.record(1, chain, 6 * BLOCK_CHARS)
    index.record(2, chain_of(6, "other"), 6 * BLOCK_CHARS)
    found = index.match(chain, [1, 2, 3])
    assert found[1].blocks == 6
    assert found[1].chars == 6 * BLOCK_CHARS
    assert found[1].ages == (0,) * 6
    assert found[2].blocks == 0
    assert found[2].ages == ()
    assert found.get(3, NO_MATCH).blocks == 0


def test_a_longer_prompt_matches_the_recorded_blocks() -> None:
    """A prompt extending a recorded one matches exactly the recorded part."""
    index = PrefixIndex(UNLIMITED)
    earlier = text(4, "turn one")
    index.record(1, prefix_chain(earlier), len(earlier))
    later = prefix_chain(earlier + text(5, "turn two"))
    found = index.match(later, [1])[1]
    assert found.blocks == 4
    assert len(found.ages) == 4


def test_a_prompt_diverging_from_a_recorded_one_matches_up_to_the_divergence() -> None:
    """Sharing a system prompt shares its blocks, and no more."""
    index = PrefixIndex(UNLIMITED)
    system = text(3, "system")
    index.record(1, prefix_chain(system + text(4, "user a")), 7 * BLOCK_CHARS)
    assert index.match(prefix_chain(system + text(4, "user b")), [1])[1].blocks == 3


def test_match_reports_each_key_separately() -> None:
    """Servers that were sent different lengths of one prompt match their own lengths."""
    index = PrefixIndex(UNLIMITED)
    prompt = text(8, "shared")
    for key, blocks in ((1, 2), (2, 5), (3, 8)):
        index.record(key, prefix_chain(prompt[: blocks * BLOCK_CHARS]), blocks * BLOCK_CHARS)
    found = index.match(prefix_chain(prompt), [1, 2, 3])
    assert {key: match.blocks for key, match in found.items()} == {1: 2, 2: 5, 3: 8}


def test_ages_count_characters_routed_to_the_server_since() -> None:
    """A block's age is how many characters went to its server after it was sent."""
    index = PrefixIndex(UNLIMITED)
    chain = chain_of(3, "aged")
    index.record(1, chain, 3 * BLOCK_CHARS)
    index.record(1, chain_of(2, "later"), 1000)
    index.record(2, chain_of(2, "elsewhere"), 5000)
    assert index.routed(1) == 3 * BLOCK_CHARS + 1000
    assert index.match(chain, [1])[1].ages == (1000, 1000, 1000)


def test_recording_a_chain_again_does_not_count_it_twice() -> None:
    """Re-sending a prompt refreshes its ownership without growing the index."""
    index = PrefixIndex(UNLIMITED)
    chain = chain_of(5, "again")
    index.record(1, chain, 5 * BLOCK_CHARS)
    once = index.memory_bytes
    index.record(1, chain, 5 * BLOCK_CHARS)
    assert index.memory_bytes == once
    assert index.blocks == 5
    assert index.match(chain, [1])[1].ages == (0,) * 5


# -- bounded memory -------------------------------------------------------------------------------


def test_memory_never_exceeds_the_limit_after_a_record() -> None:
    """Under a mixed workload the estimate stays within the limit, evicting as it must."""
    rng = random.Random(11)
    index = PrefixIndex(memory_limit=60_000)
    systems = [text(rng.randint(1, 6), f"system {n}") for n in range(5)]
    for turn in range(500):
        prompt = rng.choice(systems) + text(rng.uniform(0, 20), turn)
        index.record(rng.randint(1, 12), prefix_chain(prompt), len(prompt))
        assert index.memory_bytes <= index.memory_limit
    assert index.evictions > 0
    assert index.blocks > 0


def test_least_recently_recorded_chains_are_evicted_first() -> None:
    """With room for three chains, a fourth evicts the one untouched the longest."""
    a, b, c, d = (chain_of(4, name) for name in "abcd")
    index = PrefixIndex(memory_limit=cost((1, a), (1, b), (1, c)))
    for chain in (a, b, c):
        index.record(1, chain, 4 * BLOCK_CHARS)
    assert index.evictions == 0
    index.record(1, a, 4 * BLOCK_CHARS)  # a is now more recent than b
    index.record(1, d, 4 * BLOCK_CHARS)
    found = {
        name: index.match(chain, [1])[1].blocks
        for name, chain in zip("abcd", (a, b, c, d), strict=True)
    }
    assert found == {"a": 4, "b": 0, "c": 4, "d": 4}
    assert index.evictions == 4  # evictions count blocks: all four of b's
    assert index.blocks == 12


def test_matching_does_not_refresh_a_chain() -> None:
    """Only recording counts as use: a chain that is merely matched still ages out."""
    a, b, c = (chain_of(4, name) for name in "abc")
    index = PrefixIndex(memory_limit=cost((1, a), (1, b)))
    index.record(1, a, 4 * BLOCK_CHARS)
    index.record(1, b, 4 * BLOCK_CHARS)
    assert index.match(a, [1])[1].blocks == 4
    index.record(1, c, 4 * BLOCK_CHARS)
    assert index.match(a, [1])[1].blocks == 0
    assert index.match(b, [1])[1].blocks == 4


def test_a_chains_root_outlives_its_deeper_blocks() -> None:
    """Eviction takes a chain from its deepest block, so what is left still matches."""
    a, b = chain_of(4, "a"), chain_of(4, "b")
    index = PrefixIndex(memory_limit=cost((1, a), (1, b[:2])))
    index.record(1, a, 4 * BLOCK_CHARS)
    index.record(1, b, 4 * BLOCK_CHARS)
    assert index.evictions == 2
    assert index.match(a, [1])[1].blocks == 2
    assert index.match(b, [1])[1].blocks == 4


def test_a_chain_larger_than_the_limit_keeps_its_root() -> None:
    """A prompt too long for the whole index keeps as many leading blocks as fit."""
    chain = chain_of(10, "huge")
    index = PrefixIndex(memory_limit=cost((1, chain[:3])))
    index.record(1, chain, 10 * BLOCK_CHARS)
    assert index.memory_bytes <= index.memory_limit
    assert index.match(chain, [1])[1].blocks == 3


def test_a_block_keeps_at_most_max_owners() -> None:
    """Past ``MAX_OWNERS`` servers, the least recently recorded owner is dropped."""
    chain = chain_of(3, "popular")
    keys = range(1, MAX_OWNERS + 4)
    index = PrefixIndex(UNLIMITED)
    for key in keys:
        index.record(key, chain, 3 * BLOCK_CHARS)
    found = index.match(chain, keys)
    owners = [key for key in keys if found[key].blocks == 3]
    assert owners == list(keys)[-MAX_OWNERS:]
    assert all(found[key].blocks == 0 for key in list(keys)[:3])
    assert index.memory_bytes == cost(*((key, chain) for key in range(MAX_OWNERS)))


def test_re_recording_an_owner_keeps_it_among_the_max_owners() -> None:
    """A server sent the prompt again counts as its most recent owner."""
    chain = chain_of(2, "popular")
    index = PrefixIndex(UNLIMITED)
    for key in range(1, MAX_OWNERS + 1):
        index.record(key, chain, 2 * BLOCK_CHARS)
    index.record(1, chain, 2 * BLOCK_CHARS)
    index.record(MAX_OWNERS + 1, chain, 2 * BLOCK_CHARS)
    found = index.match(chain, range(1, MAX_OWNERS + 2))
    assert found[1].blocks == 2
    assert found[2].blocks == 0
    assert found[MAX_OWNERS + 1].blocks == 2


def test_the_memory_estimate_matches_measured_allocation() -> None:
    """``memory_bytes`` is within 0.7x-1.05x of what ``tracemalloc`` sees the index allocate."""
    rng = random.Random(7)
    owners = [rng.sample(range(1, 40), rng.randint(1, 3)) for _ in range(1000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(UNLIMITED)
        for number, keys in enumerate(owners):
            # Built inside the measurement: the index keeps the hashes prefix_chain allocates.
            chain = prefix_chain(f"conversation {number:06d} ".ljust(20 * BLOCK_CHARS, "x"))
            for key in keys:
                index.record(key, chain, len(chain) * BLOCK_CHARS)
        del chain
        gc.collect()
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index.blocks == 20_000
    assert 0.7 * index.memory_bytes <= measured <= 1.05 * index.memory_bytes


# -- learned retention ----------------------------------------------------------------------------


class Conversation:
    """A 10-block prompt whose first 3 blocks were re-sent recently and the rest long ago."""

    KEY = 1
    OLD = 50_000

    def __init__(self) -> None:
        self.index = PrefixIndex(UNLIMITED)
        prompt = text(10, "long conversation")
        self.chain = prefix_chain(prompt)
        self.index.record(self.KEY, self.chain, len(prompt))
        self.index.record(self.KEY, chain_of(2, "other traffic"), self.OLD)
        branch = prompt[: 3 * BLOCK_CHARS] + text(2, "a branch")
        self.index.record(self.KEY, prefix_chain(branch), len(branch))

    def match(self) -> tuple[int, tuple[int, ...]]:
        found = self.index.match(self.chain, [self.KEY])[self.KEY]
        return found.blocks, found.ages

    def learn(self, cached_blocks: float) -> None:
        found = self.index.match(self.chain, [self.KEY])[self.KEY]
        self.index.learn(self.KEY, found, int(cached_blocks * BLOCK_CHARS))


def test_the_conversation_fixture_has_young_and_old_blocks() -> None:
    """The setup the retention tests rely on: three fresh blocks, seven old ones."""
    conversation = Conversation()
    blocks, ages = conversation.match()
    assert blocks == 10
    assert ages[:3] == (0, 0, 0)
    assert min(ages[3:]) > Conversation.OLD


def test_a_confirmed_hit_keeps_retention_infinite() -> None:
    """When llama.cpp had everything the index predicted, nothing is learned against it."""
    conversation = Conversation()
    conversation.learn(cached_blocks=10)
    assert conversation.index.retention(Conversation.KEY) == math.inf
    assert conversation.match()[0] == 10


def test_a_hit_one_block_short_is_still_a_hit() -> None:
    """Template tokens and the re-evaluated last token may leave a block uncounted."""
    conversation = Conversation()
    conversation.learn(cached_blocks=9.5)
    assert conversation.index.retention(Conversation.KEY) == math.inf


def test_a_miss_lowers_retention_so_old_blocks_stop_matching() -> None:
    """Cache covering only the fresh blocks means the old ones are gone; ages still show."""
    conversation = Conversation()
    conversation.learn(cached_blocks=3.2)
    retention = conversation.index.retention(Conversation.KEY)
    _, ages = conversation.match()
    assert max(ages[:3]) <= retention < min(ages[3:])
    blocks, ages_after = conversation.match()
    assert blocks == 3
    assert ages_after == ages
    assert len(ages_after) == 10


def test_a_later_hit_on_older_blocks_raises_retention_again() -> None:
    """If llama.cpp turns out to keep older blocks after all, they match again."""
    conversation = Conversation()
    conversation.learn(cached_blocks=3)
    lowered = conversation.index.retention(Conversation.KEY)
    conversation.index.record(Conversation.KEY, chain_of(1, "more traffic"), 1000)
    assert conversation.match()[0] == 3
    conversation.learn(cached_blocks=10)
    raised = conversation.index.retention(Conversation.KEY)
    assert raised > lowered
    blocks, ages = conversation.match()
    assert blocks == 10
    assert max(ages) <= raised


def test_learning_is_per_key() -> None:
    """A miss on one server leaves another's retention alone."""
    conversation = Conversation()
    conversation.index.record(2, conversation.chain, 10 * BLOCK_CHARS)
    conversation.learn(cached_blocks=3)
    assert conversation.index.retention(2) == math.inf
    assert conversation.index.match(conversation.chain, [2])[2].blocks == 10


def test_learning_about_an_unknown_key_changes_nothing() -> None:
    """Reports for a server the index never saw (or forgot) are ignored."""
    conversation = Conversation()
    found = conversation.index.match(conversation.chain, [Conversation.KEY])[Conversation.KEY]
    conversation.index.learn(99, found, 0)
    assert conversation.index.retention(99) == math.inf
    assert conversation.index.match(conversation.chain, [99]).get(99, NO_MATCH).blocks == 0


def test_forget_makes_a_key_match_nothing() -> None:
    """A server whose cache is gone owns no prefixes; other servers keep theirs."""
    index = PrefixIndex(UNLIMITED)
    chain = chain_of(4, "forgotten")
    index.record(1, chain, 4 * BLOCK_CHARS)
    index.record(2, chain, 4 * BLOCK_CHARS)
    index.forget(1)
    found = index.match(chain, [1, 2])
    assert found.get(1, NO_MATCH).blocks == 0
    assert found[2].blocks == 4
    assert index.routed(1) == 0


def test_a_miss_younger_than_a_confirmed_hit_is_not_taken_for_an_eviction() -> None:
    """llama.cpp evicts by age: after a hit at some age, a miss on a younger block means the
    request took another slot, not that the cache shrank, so retention stays as it was."""
    index = PrefixIndex(10**9)
    old = chain_of(6, "old")
    index.record(1, old, 6 * BLOCK_CHARS)
    for number in range(4):
        index.record(1, chain_of(6, f"filler {number}"), 6 * BLOCK_CHARS)
    hit = index.match(old, [1])[1]
    index.learn(1, hit, 6 * BLOCK_CHARS)
    assert index.retention(1) == math.inf
    fresh = chain_of(6, "fresh")
    index.record(1, fresh, 6 * BLOCK_CHARS)
    young = index.match(fresh, [1])[1]
    assert max(young.ages) < min(hit.ages)
    index.learn(1, young, 0)
    assert index.retention(1) == math.inf
    assert index.match(old, [1])[1].blocks == 6
