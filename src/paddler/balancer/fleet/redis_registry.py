"""The fleet's members, shared by several balancers through Redis (issue 11; docs/ha.md).

Not wired into the balancer yet. An agent reports to one balancer at a time (its *owner*); the
owner writes what every replica must know of the agent (``AgentRecord``: its address, models,
counted slots, state, whether it was verified) with each registration and report, and every
replica follows the changes, so that a balancer that starts later reads the whole fleet at once
rather than waiting for the agents to come to it.

- ``{fleet}:agents``, a hash: agent id → its record, as JSON, with a ``version``;
- ``{fleet}:agents:seen``, a sorted set: agent id → when its record expires (Redis's clock, ms):
  a record the owner stops writing (the owner died, the agent is gone) expires after
  ``stale_after``, as ``--agent-stale-after`` forgets an agent in one balancer;
- ``{fleet}:agents:versions``, a hash: agent id → the version of its last change;
- ``{fleet}:agents:changed``, a pub/sub channel: every change, as the record itself (or
  ``{"id": ..., "removed": true, "version": ...}``), so that followers need no round trip.

Each write is one Lua script, which numbers the change: a follower applies a change only if it is
newer than what it holds for that agent, so that the snapshot it reads at start and the changes
published meanwhile can arrive in any order. An agent id is ``name@host:port`` (the pool's), the
same whichever replica the agent reports to; an agent that moves to another replica is taken
over by the new owner's next write.

An expired record is removed (and its removal published) by ``snapshot`` and ``reap``, which any
replica may call: a housekeeping timer, not the path of a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LISTEN_TIMEOUT = 1.0
"""How long a read of a channel waits before the connection's health is looked at again."""

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_REAP = """
local function reap(agents, seen, versions, channel)
  local expired = redis.call('ZRANGEBYSCORE', seen, '-inf', now)
  for _, id in ipairs(expired) do
    redis.call('HDEL', agents, id)
    redis.call('ZREM', seen, id)
    local version = redis.call('HINCRBY', versions, id, 1)
    redis.call('PUBLISH', channel, cjson.encode({id = id, removed = true, version = version}))
  end
  return #expired
end
"""

_PUT = (
    _NOW
    + """
local record = cjson.decode(ARGV[1])
record.version = redis.call('HINCRBY', KEYS[3], record.id, 1)
local text = cjson.encode(record)
redis.call('HSET', KEYS[1], record.id, text)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), record.id)
redis.call('PUBLISH', ARGV[3], text)
return record.version
"""
)
"""KEYS: agents, seen, versions; ARGV: the record (JSON), how long it lives unless written
again (ms), the channel. Returns the change's version."""

_REMOVE = (
    _NOW
    + """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local version = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('PUBLISH', ARGV[2], cjson.encode({id = ARGV[1], removed = true, version = version}))
return removed
"""
)
"""KEYS: agents, seen, versions; ARGV: the agent id, the channel. Returns 1 if it was there."""

_SNAPSHOT = (
    _NOW
    + _REAP
    + """
reap(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return redis.call('HVALS', KEYS[1])
"""
)
"""KEYS: agents, seen, versions; ARGV: the channel. Returns every live record."""

_REAP_ONLY = (
    _NOW
    + _REAP
    + """
return reap(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
"""
)
"""KEYS: agents, seen, versions; ARGV: the channel. Returns how many records expired."""


@dataclass(frozen=True)
class AgentRecord:
    """What every replica knows of an agent, as its owner last wrote it."""

    id: str
    name: str
    scheme: str
    host: str
    port: int
    models: tuple[str, ...]
    slots_total: int
    """The slots counted there (0 until verified)."""
    state: str
    error: str | None
    verified: bool
    owner: str
    """The replica the agent reports to."""
    version: int = 0
    """Numbered by Redis at each change (0: not written yet)."""

    @classmethod
    def from_json(cls, text: str | bytes) -> AgentRecord:
        fields = json.loads(text)
        fields["models"] = tuple(fields.get("models") or ())
        fields["port"] = int(fields["port"])
        fields["slots_total"] = int(fields["slots_total"])
        fields["version"] = int(fields.get("version") or 0)
        fields["error"] = fields.get("error") or None
        return cls(**{key: fields[key] for key in cls.__dataclass_fields__ if key in fields})


Change = AgentRecord | tuple[str, int]
"""A record written, or ``(id, version)``: the agent was removed."""


class RedisRegistry:
    """One replica's side of the shared membership: writes its own agents' records, and follows
    everyone's. ``stale_after``: how long a record lives unless written again."""

    def __init__(
        self,
        client: Redis,
        fleet: str = "paddler",
        *,
        replica: str,
        stale_after: float,
        subscriber: Redis | None = None,
    ) -> None:
        """``subscriber``: the client ``follow`` subscribes with (by default ``client``): one
        without a read timeout, since a channel may be quiet for long (see ``shared_state``)."""
        self._client = client
        self._subscriber = subscriber or client
        tag = "{" + fleet + "}"
        self._keys = [f"{tag}:agents", f"{tag}:agents:seen", f"{tag}:agents:versions"]
        self.channel = f"{tag}:agents:changed"
        self.replica = replica
        self._stale_ms = max(1, round(stale_after * 1000))
        self._put = client.register_script(_PUT)
        self._remove = client.register_script(_REMOVE)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._reap = client.register_script(_REAP_ONLY)
        self.agents: dict[str, AgentRecord] = {}
        """The fleet as this replica follows it (``follow``), by agent id."""
        self._versions: dict[str, int] = {}
        """The newest version applied per agent, removals included."""

    async def put(self, record: AgentRecord) -> int:
        """Write an agent this replica owns (at registration and with each report); the
        change's version."""
        fields = asdict(record) | {"owner": self.replica}
        fields.pop("version")
        text = json.dumps(fields)
        return int(await self._put(keys=self._keys, args=[text, self._stale_ms, self.channel]))

    async def remove(self, agent_id: str) -> bool:
        """The agent left (deregistered, or forgotten by its owner); whether it was there."""
        return bool(await self._remove(keys=self._keys, args=[agent_id, self.channel]))

    async def snapshot(self) -> dict[str, AgentRecord]:
        """Every live record now (expired ones are removed first, and said so)."""
        texts = await self._snapshot(keys=self._keys, args=[self.channel])
        records = (AgentRecord.from_json(text) for text in texts)
        return {record.id: record for record in records}

    async def reap(self) -> int:
        """Remove the records that expired; how many."""
        return int(await self._reap(keys=self._keys, args=[self.channel]))

    def apply(self, change: Change) -> bool:
        """Take a change into ``agents`` if it is newer than what is held; whether it was."""
        agent_id, version = (
            (change.id, change.version) if isinstance(change, AgentRecord) else change
        )
        if version <= self._versions.get(agent_id, 0):
            return False
        self._versions[agent_id] = version
        if isinstance(change, AgentRecord):
            self.agents[agent_id] = change
        else:
            self.agents.pop(agent_id, None)
        return True

    async def follow(
        self,
        on_change: Callable[[Change], None],
        ready: asyncio.Event | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Keep ``agents`` up to date until ``stop`` is set (within ``LISTEN_TIMEOUT``) or the
        task is cancelled, calling ``on_change`` with each change applied: subscribe, then read
        the snapshot (so that no change falls between the two), then the changes as they come.
        ``ready`` is set once the snapshot is in. (A stop flag as well as cancellation: a
        cancellation that lands inside redis-py's read can be lost in it.)"""
        channels = self._subscriber.pubsub()
        try:
            await channels.subscribe(self.channel)
            snapshot = await self.snapshot()
            for gone in set(self.agents) - set(snapshot):
                # Removed while this replica was not following (it lost Redis).
                del self.agents[gone]
                on_change((gone, self._versions.get(gone, 0)))
            for record in snapshot.values():
                if self.apply(record):
                    on_change(record)
            if ready is not None:
                ready.set()
            while stop is None or not stop.is_set():
                # A read that returns now and then, so that the client checks the connection's
                # health (a PING when it has been quiet): a Redis cut off without a close is
                # noticed, not waited for.
                message = await channels.get_message(
                    ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT
                )
                if message is None or message.get("type") != "message":
                    continue
                change = _change_of(message["data"])
                if change is not None and self.apply(change):
                    on_change(change)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await channels.aclose()  # type: ignore[no-untyped-call]


def _change_of(data: Any) -> Change | None:
    try:
        fields = json.loads(data)
        if fields.get("removed"):
            return str(fields["id"]), int(fields["version"])
        return AgentRecord.from_json(data)
    except (ValueError, KeyError, TypeError) as error:
        # Only balancers write here: a message that does not parse is a bug to survive.
        log.warning("ignoring a malformed fleet change on Redis: %r (%s)", data[:200], error)
        return None
