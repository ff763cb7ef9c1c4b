"""Slot reservations shared by several balancers: leases in Redis, taken and given back by scripts.

The first piece of ``--state redis://`` (issue 11; see docs/ha.md, which says what is built):
it is not wired into the balancer yet. It keeps in Redis, per server, what one balancer keeps in
``agent_controller`` for its own reservations, so that the sum of the reservations every
replica holds on a server never exceeds the slots it has free:

- ``{fleet}:agent:ID``, a hash: ``total`` (the slots counted there), ``foreign`` (busy in the
  last report beyond the leases held when it came) and ``usable`` (``1`` when requests may go
  there at all);
- ``{fleet}:leases:ID``, a sorted set: one member per reservation (its lease id), scored by when
  the lease expires, in milliseconds of Redis's clock;
- ``{fleet}:settling:ID``, a sorted set: slots released after their client left, until llama.cpp
  frees them (the next report, or their deadline).

A server's busy slots are ``leases + foreign + settling``, as ``AgentController.busy_slots``.

Every change is one Lua script, so that a reservation is checked and taken atomically whichever
replica asks: reading the counts from Python and writing the lease after would let two replicas
take the last slot at once. The scripts read the time from Redis (``TIME``), not from the
replicas, so that replicas whose clocks disagree still agree on which leases have expired.
Expired leases and settling slots are dropped by the scripts that read them (lazily): each
change costs O(log n) in the leases of one server. All of one fleet's keys share a hash tag
(``{fleet}``), so that a script may touch several servers' keys on a Redis Cluster too.

A lease is renewed by the replica that holds it (``renew``), every third of its timeout or so;
when a replica dies, its leases expire, and their slots come back to the fleet within the lease
timeout. A lease found expired is gone: renewing it does not bring it back, since its slot may
have been given to another request meanwhile (the server's next report then counts the request
still running there as a foreign slot).

Scripts are sent as ``EVALSHA``, and again whole when Redis has forgotten them (a restart):
redis-py's ``Script`` does that.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""
"""Redis's clock in milliseconds, as ``now``."""

_RESERVE = (
    _NOW
    + """
local lease, ttl = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS, 3 do
  local fields = redis.call('HMGET', KEYS[i], 'total', 'foreign', 'usable')
  if fields[3] == '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
    redis.call('ZREMRANGEBYSCORE', KEYS[i + 2], '-inf', now)
    local busy = redis.call('ZCARD', KEYS[i + 1]) + tonumber(fields[2] or '0')
      + redis.call('ZCARD', KEYS[i + 2])
    if busy < tonumber(fields[1] or '0') then
      redis.call('ZADD', KEYS[i + 1], now + ttl, lease)
      return (i + 2) / 3
    end
  end
end
return 0
"""
)
"""KEYS: the agent, leases and settling keys of each candidate, in order of preference;
ARGV: the lease id, its timeout (ms). Returns the chosen candidate's position (1-based), or 0."""

_RELEASE = (
    _NOW
    + """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
local settle = tonumber(ARGV[2])
if removed == 1 and settle > 0 then
  redis.call('ZADD', KEYS[3], now + settle, ARGV[1])
end
return removed
"""
)
"""KEYS: agent, leases, settling; ARGV: the lease id, how long its slot settles (ms; 0: it is
free at once). Returns 1 if the lease was held (released now), 0 otherwise."""

_REPORT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZCARD', KEYS[2])
local total, processing = tonumber(ARGV[1]), tonumber(ARGV[2])
local foreign = math.max(0, processing - held)
redis.call('HSET', KEYS[1], 'total', total, 'foreign', foreign, 'usable', ARGV[3])
redis.call('DEL', KEYS[3])
return math.max(0, total - held - foreign)
"""
)
"""KEYS: agent, leases, settling; ARGV: slots counted, slots the report saw processing, usable
(1 or 0). Returns the free slots after it."""

_RENEW = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local until_ms = now + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], until_ms, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""
)
"""KEYS: leases; ARGV: the timeout (ms), then the lease ids. Returns how many were still held."""

_FREE = (
    _NOW
    + """
local fields = redis.call('HMGET', KEYS[1], 'total', 'foreign')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local busy = redis.call('ZCARD', KEYS[2]) + tonumber(fields[2] or '0') + redis.call('ZCARD', KEYS[3])
return {math.max(0, tonumber(fields[1] or '0') - busy), redis.call('ZCARD', KEYS[2])}
"""
)
"""KEYS: agent, leases, settling. Returns the free slots and the leases held."""


class RedisLeases:
    """The slot leases of one fleet (every balancer given the same ``fleet`` name shares them).

    ``lease_timeout``: how long a lease lasts unless renewed (the bound on how long a dead
    replica's reservations keep their slots)."""

    def __init__(self, client: Redis, fleet: str = "paddler", lease_timeout: float = 10.0) -> None:
        self._client = client
        self._tag = "{" + fleet + "}"
        self._ttl_ms = max(1, round(lease_timeout * 1000))
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._report = client.register_script(_REPORT)
        self._renew = client.register_script(_RENEW)
        self._free = client.register_script(_FREE)

    def _keys(self, agent_id: str) -> list[str]:
        return [
            f"{self._tag}:agent:{agent_id}",
            f"{self._tag}:leases:{agent_id}",
            f"{self._tag}:settling:{agent_id}",
        ]

    async def report(
        self, agent_id: str, *, slots_total: int, slots_processing: int, usable: bool
    ) -> int:
        """Apply an agent's report (as ``AgentController.accept_report``); the free slots after."""
        args = [slots_total, slots_processing, 1 if usable else 0]
        return int(await self._report(keys=self._keys(agent_id), args=args))

    async def reserve(self, candidates: Sequence[str], lease_id: str) -> str | None:
        """Take a lease named ``lease_id`` on the first of ``candidates`` (agent ids, best first)
        that is usable and has a free slot; which one, or None if none has."""
        if not candidates:
            return None
        keys = [key for agent_id in candidates for key in self._keys(agent_id)]
        chosen = int(await self._reserve(keys=keys, args=[lease_id, self._ttl_ms]))
        return candidates[chosen - 1] if chosen else None

    async def release(self, agent_id: str, lease_id: str, *, settle_for: float = 0.0) -> bool:
        """Give the lease back; ``settle_for``: seconds its slot still counts as busy (a client
        that left: llama.cpp frees the slot a moment later). Whether the lease was still held
        (False: released already, or expired)."""
        settle_ms = max(0, round(settle_for * 1000))
        return bool(await self._release(keys=self._keys(agent_id), args=[lease_id, settle_ms]))

    async def renew(self, agent_id: str, lease_ids: Sequence[str]) -> int:
        """Extend these leases by the lease timeout from now; how many were still held."""
        if not lease_ids:
            return 0
        keys = self._keys(agent_id)[1:2]
        return int(await self._renew(keys=keys, args=[self._ttl_ms, *lease_ids]))

    async def slots(self, agent_id: str) -> tuple[int, int]:
        """The server's free slots and the leases held on it, now."""
        free, held = await self._free(keys=self._keys(agent_id))
        return int(free), int(held)
