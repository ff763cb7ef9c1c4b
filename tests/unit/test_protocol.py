"""The agent wire protocol is strict: bad messages are refused with a clear reason."""

from __future__ import annotations

import json

import pytest

from paddler import protocol
from paddler.protocol import LlamaCppState


def register(**overrides: object) -> dict[str, object]:
    message: dict[str, object] = {
        "v": 1,
        "type": "register",
        "name": "gpu-1",
        "host": "10.0.0.5",
        "port": 8080,
        "status": {"type": "status", "state": "ok", "slots_idle": 4, "slots_processing": 0},
    }
    message.update(overrides)
    return message


def test_a_valid_register_round_trips() -> None:
    """A register message survives encoding and parsing unchanged."""
    message = protocol.parse_agent_message(json.dumps(register()))
    assert isinstance(message, protocol.Register)
    assert message.status.state is LlamaCppState.OK
    assert protocol.parse_agent_message(protocol.encode(message)) == message


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("not json", "Invalid JSON"),
        (json.dumps({"type": "hello"}), "type"),
        (json.dumps(register(extra=1)), "extra"),
        (json.dumps(register(port="8080")), "port"),
        (json.dumps(register(port=70000)), "port"),
        (json.dumps(register(v=2)), "v"),
        (json.dumps(register(host="evil.com/path")), "host"),
        (json.dumps({"type": "status", "state": "ok", "slots_idle": -1}), "slots_idle"),
        (json.dumps({"type": "status", "state": "sleepy"}), "state"),
        (json.dumps({"type": "status", "state": "ok", "slots_idle": True}), "slots_idle"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(raw: str, complaint: str) -> None:
    """Unknown fields, wrong types, bad versions and bad values each name the problem."""
    with pytest.raises(protocol.ProtocolError, match=complaint):
        protocol.parse_agent_message(raw)


def test_oversized_messages_are_refused_before_parsing() -> None:
    """A frame beyond the size limit is refused without being parsed."""
    with pytest.raises(protocol.ProtocolError, match="larger than"):
        protocol.parse_agent_message("x" * (protocol.MAX_MESSAGE_BYTES + 1))
