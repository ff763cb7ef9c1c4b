"""Sizing each llama.cpp server so that the chat sessions overflow one server but fit the fleet.

Prefix-aware routing can only win where the cache is the bottleneck: if one server held every
session, any routing would hit; if the fleet could not hold them, none would. So the RAM prompt
cache (``--cache-ram``) is sized from the workload.

What llama.cpp's prompt cache does, measured on this build with the benchmark's model (cycling
``n`` distinct prompts of 1565 tokens through one server, one request at a time, three times):

- When a slot takes a prompt that does not extend what it holds, the state it held (the KV cells
  of its sequence, prompt and generated tokens) is saved in the RAM cache, and the cached state
  sharing the longest prefix with the new prompt is loaded. A state costs 4108 bytes per token
  with this model (6.241 MiB for 1593 tokens, 12.118 MiB for 3093): the KV cache's
  2 x 4 layers x 256 x f16 = 4096 bytes, plus 12.
- Eviction is least recently used, by bytes ("making room for prompt cache entry, removing
  oldest entry"); a cached state that is a prefix of the one being saved is dropped as obsolete,
  so a session occupies one entry however many turns it has had.
- The token limit (the context size) does not bind: llama.cpp raises it to what the byte limit
  holds. 1 slot, 4096 tokens of context, 100 MiB: 16 prompts (25 000 tokens) all hit, 17 never.
- The slots add about one state, not one each: 2 slots and 40 MiB hold 7 prompts (8 thrash),
  4 slots and 40 MiB also 7 (floor(40 / 6.24) = 6 in RAM, plus the slot just used). The cache
  keeps a copy of what the slots hold.

So a server holds about ``floor(cache_ram / state) + 1`` sessions, and an LRU cache shown a
cycle of more sessions than that hits none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.workloads import ChatRequest
from paddler.tiny_model import TinyModelShape

MIB = 1024 * 1024
STATE_OVERHEAD_BYTES_PER_TOKEN = 12
"""Measured: a saved state's bytes per token beyond the KV cache's own."""
HEADROOM = 1.125
"""Room per server beyond its share of the sessions, for routing that also weighs load."""


def state_bytes_per_token(shape: TinyModelShape) -> int:
    """K and V, f16, per layer: what one token of a saved prompt state costs."""
    return 2 * 2 * shape.block_count * shape.embedding_length + STATE_OVERHEAD_BYTES_PER_TOKEN


@dataclass(frozen=True)
class CacheSizing:
    lanes: int
    servers: int
    sessions_per_server: int
    """How many sessions one server is sized to hold."""
    mean_state_tokens: float
    """A session's cached state, on average over the requests: prompt plus generated tokens."""
    bytes_per_token: int
    cache_ram_mib: int

    @property
    def mean_state_mib(self) -> float:
        return self.mean_state_tokens * self.bytes_per_token / MIB

    def explain(self) -> str:
        return (
            f"{self.lanes} sessions are open at any time, each with a cached state of about "
            f"{self.mean_state_tokens:.0f} tokens ({self.mean_state_mib:.1f} MiB at "
            f"{self.bytes_per_token} bytes per token). Each server is sized for "
            f"{self.sessions_per_server} of them ({HEADROOM:g} x {self.lanes}/{self.servers}, "
            f"rounded up): --cache-ram {self.cache_ram_mib} MiB holds "
            f"{self.sessions_per_server - 1} and the slot last used one more. One server "
            f"cannot hold all {self.lanes} (a server sent every session thrashes its LRU "
            f"cache), the fleet of {self.servers} holds them with room to spare."
        )


def size_cache(
    chat: list[ChatRequest], lanes: int, servers: int, shape: TinyModelShape
) -> CacheSizing:
    """The ``--cache-ram`` for workload (a)'s requests ``chat`` over ``servers`` servers."""
    sessions_per_server = math.ceil(HEADROOM * lanes / servers)
    if sessions_per_server >= lanes:
        raise ValueError(
            f"{servers} server(s) for {lanes} lanes: one server would have to hold every "
            "session, so routing could not matter; use more servers or more lanes"
        )
    mean_tokens = sum(r.prompt_tokens_estimate + r.max_tokens for r in chat) / len(chat)
    per_token = state_bytes_per_token(shape)
    cache_mib = math.ceil((sessions_per_server - 1) * mean_tokens * per_token / MIB)
    return CacheSizing(lanes, servers, sessions_per_server, mean_tokens, per_token, cache_mib)
