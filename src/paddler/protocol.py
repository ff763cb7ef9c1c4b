"""The agent-to-balancer wire protocol, version 1.

An agent opens one WebSocket to the balancer's management port
(``GET /api/v1/agents/socket``, ``Authorization: Bearer <token>``) and sends JSON text frames:

1. ``register`` once, first: its name, the address the balancer should proxy to, and its first
   status report;
2. ``status`` whenever what it sees of llama.cpp changes, and at least once per reporting
   interval;
3. ``deregister`` when it shuts down, before closing.

The balancer answers ``registered`` (with the id it assigned) or ``error`` and closes the socket.
Every message is strict: an unknown field, a missing field or a wrong type is refused. What an
agent says is not believed blindly:

- ``host`` must be a host name (RFC 1123 labels) or an IP address (IPv6 without brackets);
- ``name`` may not contain control or format characters (Unicode categories ``Cc``, ``Cf``,
  ``Zl``, ``Zp``, ``Cs``, ``Co``, ``Cn``): it is logged and shown on dashboards;
- ``status`` frames are applied at most ``STATUS_FRAMES_PER_SECOND`` per socket (with a burst of
  ``STATUS_FRAME_BURST``); the balancer reads faster frames later, and closes a socket that stays
  over that budget for ``STATUS_FLOOD_SECONDS`` (see ``paddler.balancer.management.frame_budget``).
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from paddler.safe_text import first_unsafe

T = TypeVar("T")

PROTOCOL_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 64 * 1024
AGENT_SOCKET_PATH = "/api/v1/agents/socket"
STATUS_FRAMES_PER_SECOND = 20.0
"""Status frames a socket may send per second, sustained; the agent stays below it."""
STATUS_FRAME_BURST = 40
"""Status frames a socket may send at once, above the sustained rate."""
STATUS_FLOOD_SECONDS = 5.0
"""How long a socket may stay over its frame budget before the balancer closes it."""

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
"""RFC 1123 labels, and "_": Docker Compose names containers "app_server_1", and they resolve."""


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name (RFC 1123) or an IP address, or None if it is one."""
    if "%" in host:
        # ``ipaddress`` accepts an IPv6 zone ("fe80::1%eth0") made of any characters at all.
        return "host may not carry an IPv6 zone ('%')"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if ":" in host:
        return "host has ':' but is not an IPv6 address (give IPv6 without brackets)"
    name = host.removesuffix(".")
    labels = name.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return (
            "host must be an IP address or a host name of dot-separated labels of letters, "
            "digits, '_' and '-' (not at either end), each 1 to 63 long"
        )
    if labels[-1].isdigit():
        return "host looks like an IPv4 address but is not a valid one"
    return None


class LlamaCppState(StrEnum):
    """What an agent currently knows about its llama.cpp server."""

    OK = "ok"
    LOADING = "loading"
    UNREACHABLE = "unreachable"
    UNAUTHORIZED = "unauthorized"
    SLOTS_DISABLED = "slots_disabled"
    ERROR = "error"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class Status(_Message):
    """One observation of a llama.cpp server, as the agent saw it."""

    type: Literal["status"] = "status"
    state: LlamaCppState
    slots_idle: Annotated[int, Field(ge=0, le=65536)] = 0
    slots_processing: Annotated[int, Field(ge=0, le=65536)] = 0
    models: tuple[Annotated[str, Field(max_length=512)], ...] = Field(default=(), max_length=64)
    error: Annotated[str, Field(max_length=2048)] | None = None

    @property
    def slots_total(self) -> int:
        return self.slots_idle + self.slots_processing


class Register(_Message):
    """The first message on a socket: who the agent is and where its llama.cpp listens."""

    type: Literal["register"] = "register"
    name: Annotated[str, Field(min_length=1, max_length=256)]
    scheme: Literal["http", "https"] = "http"
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)]
    status: Status

    @model_validator(mode="after")
    def _safe_name_and_host(self) -> Register:
        if (char := first_unsafe(self.name)) is not None:
            raise ValueError(
                f"name may not contain control or format characters (found U+{ord(char):04X})"
            )
        if (problem := host_problem(self.host)) is not None:
            raise ValueError(problem)
        return self


class Deregister(_Message):
    type: Literal["deregister"] = "deregister"


class Registered(_Message):
    type: Literal["registered"] = "registered"
    agent_id: str


class Error(_Message):
    type: Literal["error"] = "error"
    message: str


AgentMessage = Annotated[Register | Status | Deregister, Field(discriminator="type")]
BalancerMessage = Annotated[Registered | Error, Field(discriminator="type")]

_agent_message: TypeAdapter[Register | Status | Deregister] = TypeAdapter(AgentMessage)
_balancer_message: TypeAdapter[Registered | Error] = TypeAdapter(BalancerMessage)
_status: TypeAdapter[Status] = TypeAdapter(Status)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def parse_agent_message(raw: str | bytes) -> Register | Status | Deregister:
    """A message of the agent's, or ``ProtocolError`` saying what is wrong with it.

    Nearly every frame is a ``status``, one a second from every agent: it is tried first, as a
    ``Status`` alone (2.2 µs against 3.3 for the tagged union, measured on an idle agent's
    frame). Anything else, or a status that is not valid, is parsed as the union, so that the
    message and the error are exactly the union's. (msgspec would take 0.7 µs, but only a
    report that differs from the one before it on its socket is parsed at all, and a frame
    costs the balancer 40-50 µs of the kernel's and the loop's work anyway: not worth a second
    schema of the protocol.)
    """
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            status = _status.validate_json(raw)
        except ValidationError:
            pass
        else:
            # A missing "type" takes Status' default; the union needs it to tell messages apart.
            if "type" in status.model_fields_set:
                return status
    return _parse(_agent_message, raw)


def parse_balancer_message(raw: str | bytes) -> Registered | Error:
    return _parse(_balancer_message, raw)


def _parse(adapter: TypeAdapter[T], raw: str | bytes) -> T:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        return adapter.validate_json(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
            for problem in error.errors(include_url=False)
        )
        raise ProtocolError(problems) from None


def encode(message: _Message) -> str:
    return message.model_dump_json()
