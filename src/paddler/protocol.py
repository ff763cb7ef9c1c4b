"""The agent-to-balancer wire protocol, version 1.

An agent opens one WebSocket to the balancer's management port
(``GET /api/v1/agents/socket``, ``Authorization: Bearer <token>``) and sends JSON text frames:

1. ``register`` once, first: its name, the address the balancer should proxy to, and its first
   status report;
2. ``status`` whenever what it sees of llama.cpp changes, and at least once per reporting
   interval;
3. ``deregister`` when it shuts down, before closing.

The balancer answers ``registered`` (with the id it assigned) or ``error`` and closes the socket.
Every message is strict: an unknown field, a missing field or a wrong type is refused.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

T = TypeVar("T")

PROTOCOL_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 64 * 1024
AGENT_SOCKET_PATH = "/api/v1/agents/socket"


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
    def _host_is_a_host(self) -> Register:
        if any(char in self.host for char in "/?#@ \t\r\n"):
            raise ValueError("host must be a bare host name or address")
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


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def parse_agent_message(raw: str | bytes) -> Register | Status | Deregister:
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
