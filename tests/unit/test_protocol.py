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


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.5",
        "localhost",
        "gpu-1.example.com",
        "example.com.",
        "app_server_1",
        "xn--bcher-kva.ch",
        "::1",
        "fe80::1",
        "2001:db8::8a2e:370:7334",
    ],
)
def test_host_names_and_ip_addresses_are_accepted(host: str) -> None:
    """RFC 1123 host names (and Docker's '_'), IPv4, and IPv6 without brackets register."""
    message = protocol.parse_agent_message(json.dumps(register(host=host)))
    assert isinstance(message, protocol.Register)
    assert message.host == host


@pytest.mark.parametrize(
    ("host", "complaint"),
    [
        ("127.0.0.1:80", "':'"),
        ("a:b", "':'"),
        ("[::1]", "':'"),
        ("fe80::1%eth0", "zone"),
        ("gpu\x00.example.com", "labels"),
        ("gpu\n1", "labels"),
        ("gpu\x1b[2J", "labels"),
        ("a..b", "labels"),
        (".a", "labels"),
        ("-gpu.example.com", "labels"),
        ("gpu-.example.com", "labels"),
        ("gpü.example.com", "labels"),
        ("a" * 64 + ".com", "labels"),
        ("1.2.3.999", "IPv4"),
        ("evil.com/path", "labels"),
        ("user@host", "labels"),
    ],
)
def test_hosts_that_are_neither_a_name_nor_an_address_are_refused(
    host: str, complaint: str
) -> None:
    """A port, a zone, a NUL, controls, empty or malformed labels, a path: refused, with why."""
    with pytest.raises(protocol.ProtocolError, match=complaint):
        protocol.parse_agent_message(json.dumps(register(host=host)))


@pytest.mark.parametrize(
    "name",
    [
        "gpu\n2026-12-01 12:00:00,000 INFO paddler: forged",
        "gpu\r1",
        "gpu\x1b[31m",
        "gpu\x00",
        "gpu\u202eevil",  # right-to-left override: reads as another name
        "gpu\u200b",  # zero-width space
        "gpu\u2028line",
        "gpu\ue000",  # private use
        "gpu\U000e0001",  # a tag character (format)
    ],
)
def test_names_with_control_or_format_characters_are_refused(name: str) -> None:
    """A name that could forge a log line or rewrite a terminal is refused, naming the code point."""
    with pytest.raises(protocol.ProtocolError, match=r"name may not contain .* \(found U\+"):
        protocol.parse_agent_message(json.dumps(register(name=name)))


@pytest.mark.parametrize("name", ["gpu-1", "GPU 1 (rack 4)", "[bold]gpu[/]", "<b>x</b>", "노드-1"])
def test_names_of_printable_characters_are_accepted(name: str) -> None:
    """Spaces, brackets, markup-looking text and non-Latin letters are fine: they are shown as
    text."""
    message = protocol.parse_agent_message(json.dumps(register(name=name)))
    assert isinstance(message, protocol.Register)
    assert message.name == name
