"""Slots shared by several balancers: leases in Redis, and the tickets of requests waiting for one.

The first piece of ``--state redis://`` (issue 11; docs/ha.md says what is built): it is not
wired into the balancer yet. It keeps in Redis, per server, what one balancer keeps in
``agent_controller`` for its own reservations, and the buffer's queues, fleet-wide, so that the
sum of the reservations every replica holds on a server never exceeds its free slots, and a
request waiting at one replica is not overtaken by arrivals at another.

Per server (``ID``):

- ``{fleet}:agent:ID``, a hash: ``total`` (the slots counted there), ``foreign`` (busy in the
  last report beyond the leases held when it came) and ``usable`` (``1`` when requests may go
  there at all);
- ``{fleet}:leases:ID``, a sorted set: one member per reservation (its lease id), scored by when
  the lease expires, in milliseconds of Redis's clock;
- ``{fleet}:settling:ID``, a sorted set: slots released after their client left, until llama.cpp
  frees them (the next report, or their deadline).

A server's busy slots are ``leases + foreign + settling``, as ``AgentController.busy_slots``.

The waiting requests, fleet-wide:

- ``{fleet}:queue:MODEL`` (``{fleet}:queue:*`` for requests that name none), a sorted set of
  tickets scored by one counter (``{fleet}:seq``), so that arrivals at every replica are in one
  order;
- ``{fleet}:tickets``, the tickets' expiry (the waiting replica renews them as it renews its
  leases), and ``{fleet}:owners``, the replica that waits for each.

A freed slot (a release, or a report that shows slots freed) goes, in the same script, to the
oldest live ticket of the queues of the models that server serves (and of ``*``): the script
takes a lease named after the ticket and publishes ``TICKET SERVER`` on ``{fleet}:wake:REPLICA``,
so that the waiting replica is woken by an event, never by polling. A ticket whose replica
stopped renewing it (a dead replica) is dropped when it reaches the head of its queue. A request
that finds others of its model waiting joins the queue behind them instead of taking a slot.

Every change is one Lua script, so that a reservation is checked and taken atomically whichever
replica asks: reading the counts from Python and writing the lease after would let two replicas
take the last slot at once. The scripts read the time from Redis (``TIME``), not from the
replicas, so that replicas whose clocks disagree still agree on which leases have expired.
Expired leases and settling slots are dropped by the scripts that read them (lazily): a change
costs O(log n) in the leases of one server and the tickets of its queues. All of one fleet's
keys share a hash tag (``{fleet}``), so that a script may touch several servers' keys on a Redis
Cluster too.

A lease is renewed by the replica that holds it (``renew``); when a replica dies, its leases
expire, and their slots come back to the fleet within the lease timeout. A lease found expired
is gone: renewing it does not bring it back, since its slot may have been given to another
request meanwhile (the server's next report then counts the request still running there as a
foreign slot).

Scripts are sent as ``EVALSHA``, and again whole when Redis has forgotten them (a restart):
redis-py's ``Script`` does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis

ANY_MODEL = "*"
"""The queue of the requests that name no model (any server serves them)."""

_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function free_of(agent, leases, settling)
  local fields = redis.call('HMGET', agent, 'total', 'foreign', 'usable')
  if fields[3] ~= '1' then
    return 0
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', settling, '-inf', now)
  return tonumber(fields[1] or '0') - redis.call('ZCARD', leases)
    - tonumber(fields[2] or '0') - redis.call('ZCARD', settling)
end

-- The oldest live ticket of a queue and its score, dropping dead ones at its head.
local function head_of(queue, tickets, owners)
  while true do
    local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
    if #head == 0 then
      return nil, nil
    end
    local expiry = redis.call('ZSCORE', tickets, head[1])
    if expiry and tonumber(expiry) > now then
      return head[1], tonumber(head[2])
    end
    redis.call('ZREM', queue, head[1])
    redis.call('ZREM', tickets, head[1])
    redis.call('HDEL', owners, head[1])
  end
end

-- Give the server's free slots to the oldest live tickets of KEYS[first..#KEYS]; the tickets.
local function hand_off(agent, leases, settling, tickets, owners, first, ttl, server, wake)
  local handed = {}
  while free_of(agent, leases, settling) > 0 do
    local best, best_score, best_queue = nil, nil, nil
    for q = first, #KEYS do
      local ticket, score = head_of(KEYS[q], tickets, owners)
      if ticket and (best_score == nil or score < best_score) then
        best, best_score, best_queue = ticket, score, KEYS[q]
      end
    end
    if best == nil then
      break
    end
    local owner = redis.call('HGET', owners, best)
    redis.call('ZREM', best_queue, best)
    redis.call('ZREM', tickets, best)
    redis.call('HDEL', owners, best)
    redis.call('ZADD', leases, now + ttl, best)
    redis.call('PUBLISH', wake .. owner, best .. ' ' .. server)
    table.insert(handed, best)
  end
  return handed
end
"""
"""Redis's clock in milliseconds (``now``), and the functions every script shares."""

_RESERVE = (
    _PRELUDE
    + """
local queue, tickets, owners, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lease, ttl, wait, replica = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
local most_free = ARGV[5] == '1'
if head_of(queue, tickets, owners) == nil then
  local chosen, most = nil, 0
  for i = 5, #KEYS, 3 do
    local free = free_of(KEYS[i], KEYS[i + 1], KEYS[i + 2])
    if free > most then
      chosen, most = i, free
      if not most_free then
        break
      end
    end
  end
  if chosen then
    redis.call('ZADD', KEYS[chosen + 1], now + ttl, lease)
    return (chosen - 2) / 3
  end
end
if wait then
  redis.call('ZADD', queue, redis.call('INCR', seq), lease)
  redis.call('ZADD', tickets, now + ttl, lease)
  redis.call('HSET', owners, lease, replica)
  return -1
end
return 0
"""
)
"""KEYS: the demand's queue, tickets, owners, seq, then the agent, leases and settling keys of
each candidate, best first; ARGV: the lease (and ticket) id, its timeout (ms), whether to wait
(1: join the queue when no candidate can take it), the replica, whether to take the candidate
with the most free slots (1) rather than the first with one. Returns the chosen candidate's
position (1-based), -1 when it joined the queue, 0 otherwise. A request whose model has others
waiting takes no slot: it waits behind them (or gets 0)."""

_RELEASE = (
    _PRELUDE
    + """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
local settle = tonumber(ARGV[2])
if removed == 1 and settle > 0 then
  redis.call('ZADD', KEYS[3], now + settle, ARGV[1])
end
local handed = hand_off(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], 6,
  tonumber(ARGV[3]), ARGV[4], ARGV[5])
return {removed, handed}
"""
)
"""KEYS: agent, leases, settling, tickets, owners, then the queues of the server's models;
ARGV: the lease id, how long its slot settles (ms; 0: free at once), the lease timeout (ms), the
server's id, the wake channels' prefix. Returns whether the lease was held, and the tickets that
were handed a slot."""

_REPORT = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZCARD', KEYS[2])
local total, processing = tonumber(ARGV[1]), tonumber(ARGV[2])
local foreign = math.max(0, processing - held)
redis.call('HSET', KEYS[1], 'total', total, 'foreign', foreign, 'usable', ARGV[3])
redis.call('DEL', KEYS[3])
local handed = hand_off(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], 6,
  tonumber(ARGV[4]), ARGV[5], ARGV[6])
return {math.max(0, free_of(KEYS[1], KEYS[2], KEYS[3])), handed}
"""
)
"""KEYS: as ``_RELEASE``; ARGV: slots counted, slots the report saw processing, usable (1 or 0),
the lease timeout (ms), the server's id, the wake channels' prefix. Returns the free slots after
it, and the tickets that were handed a slot."""

_LEAVE = """
local waiting = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return waiting
"""
"""KEYS: the ticket's queue, tickets, owners; ARGV: the ticket. Returns 1 if it was waiting, 0
if it was not (handed a slot already, or dropped)."""

_RENEW = (
    _PRELUDE
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
"""KEYS: a server's leases, or the tickets; ARGV: the timeout (ms), then the ids. Returns how
many were still held (or waiting)."""

_SLOTS = (
    _PRELUDE
    + """
local counts = {}
for i = 1, #KEYS, 3 do
  table.insert(counts, math.max(0, free_of(KEYS[i], KEYS[i + 1], KEYS[i + 2])))
  table.insert(counts, redis.call('ZCARD', KEYS[i + 1]))
end
return counts
"""
)
"""KEYS: the agent, leases and settling keys of each server. Returns each one's free slots and
leases held, in turn."""


_LOCATE = (
    _PRELUDE
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then
  return -1
end
for i = 2, #KEYS do
  local expiry = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if expiry and tonumber(expiry) > now then
    return i - 1
  end
end
return 0
"""
)
"""KEYS: tickets, then the leases of each server; ARGV: a ticket. Returns -1 if it still waits,
the position of the server whose slot it was handed (1-based), or 0 if Redis has neither (it
restarted empty)."""

_WAITING = (
    _PRELUDE
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)
"""KEYS: tickets. Returns how many are live (waiting, their replica renewing them)."""


class Released(NamedTuple):
    held: bool
    """Whether the lease was still held (False: released already, or expired)."""
    handed: list[str]
    """The tickets given a slot of this server by the release."""


class Reported(NamedTuple):
    free: int
    """The server's free slots after the report."""
    handed: list[str]
    """The tickets given one of the slots the report freed."""


class RedisLeases:
    """The slot leases and the waiting tickets of one fleet (every balancer given the same
    ``fleet`` name shares them). ``replica``: this balancer's name among them (its tickets'
    owner, the name of its wake channel).

    ``lease_timeout``: how long a lease or a ticket lasts unless renewed (the bound on how long a
    dead replica's reservations keep their slots)."""

    def __init__(
        self,
        client: Redis,
        fleet: str = "paddler",
        *,
        replica: str = "",
        lease_timeout: float = 10.0,
    ) -> None:
        self._client = client
        tag = "{" + fleet + "}"
        self._tag = tag
        self._replica = replica
        self._ttl_ms = max(1, round(lease_timeout * 1000))
        self._tickets = f"{tag}:tickets"
        self._owners = f"{tag}:owners"
        self._seq = f"{tag}:seq"
        self.wake_prefix = f"{tag}:wake:"
        """Each replica's wake channel is this prefix and its name."""
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._report = client.register_script(_REPORT)
        self._leave = client.register_script(_LEAVE)
        self._renew = client.register_script(_RENEW)
        self._slots = client.register_script(_SLOTS)
        self._waiting = client.register_script(_WAITING)
        self._locate = client.register_script(_LOCATE)

    @property
    def wake_channel(self) -> str:
        """Where this replica hears ``TICKET SERVER``: a ticket of its was given a slot."""
        return self.wake_prefix + self._replica

    def _keys(self, agent_id: str) -> list[str]:
        return [
            f"{self._tag}:agent:{agent_id}",
            f"{self._tag}:leases:{agent_id}",
            f"{self._tag}:settling:{agent_id}",
        ]

    def _queue(self, model: str | None) -> str:
        return f"{self._tag}:queue:{ANY_MODEL if model is None else model}"

    def _handoff_keys(self, agent_id: str, models: Sequence[str]) -> list[str]:
        queues = [self._queue(model) for model in dict.fromkeys(models)]
        return [*self._keys(agent_id), self._tickets, self._owners, *queues, self._queue(None)]

    async def report(
        self,
        agent_id: str,
        *,
        slots_total: int,
        slots_processing: int,
        usable: bool,
        models: Sequence[str] = (),
    ) -> Reported:
        """Apply an agent's report (as ``AgentController.accept_report``), and give the slots it
        freed to the tickets waiting for the server's ``models`` (or for any)."""
        args: list[str | int] = [
            slots_total,
            slots_processing,
            1 if usable else 0,
            self._ttl_ms,
            agent_id,
        ]
        free, handed = await self._report(
            keys=self._handoff_keys(agent_id, models), args=[*args, self.wake_prefix]
        )
        return Reported(int(free), _texts(handed))

    async def reserve(
        self,
        candidates: Sequence[str],
        lease_id: str,
        *,
        model: str | None = None,
        most_free: bool = False,
    ) -> str | None:
        """Take a lease named ``lease_id`` on the first of ``candidates`` (agent ids, best first)
        that is usable and has a free slot (``most_free``: on the one with the most), unless
        requests for ``model`` are waiting (they come first); which server, or None."""
        chosen = await self._reserve_or_wait(candidates, lease_id, model, False, most_free)
        return None if chosen is None or chosen == "" else chosen

    async def reserve_or_wait(
        self,
        candidates: Sequence[str],
        ticket: str,
        *,
        model: str | None = None,
        most_free: bool = False,
    ) -> str | None:
        """As ``reserve``; None: no candidate could take it, and ``ticket`` now waits in its
        model's queue, until a freed slot is given to it (announced on the owner's wake channel:
        listen before calling) or it ``leave``s."""
        chosen = await self._reserve_or_wait(candidates, ticket, model, True, most_free)
        return chosen or None

    async def _reserve_or_wait(
        self,
        candidates: Sequence[str],
        lease_id: str,
        model: str | None,
        wait: bool,
        most_free: bool,
    ) -> str | None:
        keys = [self._queue(model), self._tickets, self._owners, self._seq]
        keys += [key for agent_id in candidates for key in self._keys(agent_id)]
        args: list[str | int] = [
            lease_id,
            self._ttl_ms,
            1 if wait else 0,
            self._replica,
            1 if most_free else 0,
        ]
        chosen = int(await self._reserve(keys=keys, args=args))
        if chosen > 0:
            return candidates[chosen - 1]
        return None if chosen < 0 else ""

    async def leave(self, ticket: str, *, model: str | None = None) -> bool:
        """Stop waiting (a timeout, a client gone). False: the ticket had been given a slot
        already (its lease is held, and must be released) or dropped."""
        keys = [self._queue(model), self._tickets, self._owners]
        return bool(await self._leave(keys=keys, args=[ticket]))

    async def release(
        self,
        agent_id: str,
        lease_id: str,
        *,
        models: Sequence[str] = (),
        settle_for: float = 0.0,
    ) -> Released:
        """Give the lease back, and its slot to the oldest ticket waiting for one of the
        server's ``models`` (or for any); ``settle_for``: seconds its slot still counts as busy
        (a client that left: llama.cpp frees the slot a moment later)."""
        settle_ms = max(0, round(settle_for * 1000))
        args: list[str | int] = [lease_id, settle_ms, self._ttl_ms, agent_id, self.wake_prefix]
        held, handed = await self._release(keys=self._handoff_keys(agent_id, models), args=args)
        return Released(bool(held), _texts(handed))

    async def renew(self, agent_id: str, lease_ids: Sequence[str]) -> int:
        """Extend these leases by the lease timeout from now; how many were still held."""
        if not lease_ids:
            return 0
        keys = self._keys(agent_id)[1:2]
        return int(await self._renew(keys=keys, args=[self._ttl_ms, *lease_ids]))

    async def renew_tickets(self, tickets: Sequence[str]) -> int:
        """Extend these waiting tickets by the lease timeout; how many were still waiting."""
        if not tickets:
            return 0
        return int(await self._renew(keys=[self._tickets], args=[self._ttl_ms, *tickets]))

    async def slots(self, agent_id: str) -> tuple[int, int]:
        """The server's free slots and the leases held on it, now."""
        return (await self.slots_of([agent_id]))[0]

    async def slots_of(self, agent_ids: Sequence[str]) -> list[tuple[int, int]]:
        """``slots`` of each server, in one round trip (``/health`` reads the whole fleet)."""
        if not agent_ids:
            return []
        keys = [key for agent_id in agent_ids for key in self._keys(agent_id)]
        counts = [int(count) for count in await self._slots(keys=keys)]
        return list(zip(counts[::2], counts[1::2], strict=True))

    async def locate(self, ticket: str, servers: Sequence[str]) -> str | bool:
        """Where a ticket stands, for a replica that may have missed its hand-off (its channel
        broke): True if it still waits, the server among ``servers`` whose slot it was
        handed, or False if Redis knows neither (it restarted empty: wait again)."""
        keys = [self._tickets, *(self._keys(server)[1] for server in servers)]
        found = int(await self._locate(keys=keys, args=[ticket]))
        if found < 0:
            return True
        return servers[found - 1] if found else False

    async def waiting(self) -> int:
        """The requests waiting fleet-wide, at every replica."""
        return int(await self._waiting(keys=[self._tickets]))


def _texts(values: Any) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]
