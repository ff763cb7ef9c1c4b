"""The agent protocol parser, fuzzed: whatever arrives, it returns a message or a ProtocolError.

Three sources of frames: arbitrary bytes and text, arbitrary JSON, and valid Register and Status
frames mutated one field at a time (wrong types, extra fields, huge numbers and strings,
unicode, nesting), which reach deeper into the validators than random JSON does.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler import protocol
from paddler.protocol import LlamaCppState

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
"""Any JSON value, including integers far beyond 64 bits."""

weird_values = st.one_of(
    json_values,
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 65535, 65536, 65537, 2**31, 2**63, 2**64, -(2**63), 10**400]),
    st.text(min_size=200, max_size=3000),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(
        ["", "\x00", "\n", "ok\n", "💥", "\uff11", "\u0663", "1", "true", "null", "OK"]
    ),
    st.builds(lambda depth: json.loads("[" * depth + "]" * depth), st.integers(1, 200)),
)
"""Values to put where a valid field was: every JSON type, at its extremes."""

states = st.sampled_from([state.value for state in LlamaCppState])
# Names a valid message may carry: no control, format, separator, surrogate, private-use or
# unassigned character (see paddler.safe_text); the others are fuzzed as broken fields.
safe_names = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")),
    min_size=1,
    max_size=256,
)
hosts = st.sampled_from(["10.0.0.5", "localhost", "gpu-1.example", "::1", "127.0.0.1"])


@st.composite
def valid_statuses(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "status", "state": draw(states)}
    if draw(st.booleans()):
        message["v"] = 1
    for key in ("slots_idle", "slots_processing"):
        if draw(st.booleans()):
            message[key] = draw(st.integers(0, 65536))
    if draw(st.booleans()):
        message["models"] = draw(st.lists(st.text(max_size=512), max_size=64))
    if draw(st.booleans()):
        message["error"] = draw(st.none() | st.text(max_size=2048))
    return message


@st.composite
def valid_registers(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "register",
        "name": draw(safe_names),
        "scheme": draw(st.sampled_from(["http", "https"])),
        "host": draw(hosts),
        "port": draw(st.integers(1, 65535)),
        "status": draw(valid_statuses()),
    }


valid_messages = st.one_of(valid_statuses(), valid_registers(), st.just({"type": "deregister"}))


@st.composite
def mutated(draw: st.DrawFn, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with one to three fields replaced, removed or added, maybe in ``status``."""
    message = json.loads(json.dumps(message))
    for _ in range(draw(st.integers(1, 3))):
        target = message
        if "status" in message and isinstance(message["status"], dict) and draw(st.booleans()):
            target = message["status"]
        keys = sorted(target)
        action = draw(st.sampled_from(["replace", "remove", "add"] if keys else ["add"]))
        if action == "replace":
            target[draw(st.sampled_from(keys))] = draw(weird_values)
        elif action == "remove":
            del target[draw(st.sampled_from(keys))]
        else:
            key = draw(st.text(max_size=10) | st.sampled_from(["v", "type", "status", "models"]))
            target[key] = draw(weird_values)
    return message


def parses_or_refuses(raw: str | bytes) -> None:
    """The contract: a message of the protocol, or ProtocolError; nothing else escapes."""
    try:
        message = protocol.parse_agent_message(raw)
    except protocol.ProtocolError as error:
        reason = str(error)
    else:
        assert isinstance(message, protocol.Register | protocol.Status | protocol.Deregister)
        assert protocol.parse_agent_message(protocol.encode(message)) == message
        return
    assert reason, "a refusal names its reason"


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_parse_or_are_refused(raw: bytes) -> None:
    """Random bytes, valid UTF-8 or not, are refused with a ProtocolError, never a crash."""
    parses_or_refuses(raw)


@FUZZ
@given(st.text(max_size=2000))
def test_arbitrary_text_parses_or_is_refused(raw: str) -> None:
    """Random text frames are refused with a ProtocolError, never a crash."""
    parses_or_refuses(raw)


@FUZZ
@given(json_values)
def test_arbitrary_json_parses_or_is_refused(value: object) -> None:
    """Any JSON value, of any shape, parses to a message or is refused with a ProtocolError."""
    parses_or_refuses(json.dumps(value))


@FUZZ
@given(valid_messages.flatmap(mutated))
def test_mutated_valid_messages_parse_or_are_refused(message: dict[str, Any]) -> None:
    """Valid frames with wrong types, extra or missing fields, huge or odd values are handled."""
    parses_or_refuses(json.dumps(message))


@FUZZ
@given(valid_messages.flatmap(mutated))
def test_mutated_messages_as_bytes_in_any_encoding_are_handled(message: dict[str, Any]) -> None:
    """The same frames as bytes, with non-ASCII characters kept or escaped, are handled alike."""
    parses_or_refuses(json.dumps(message, ensure_ascii=False).encode())
    parses_or_refuses(json.dumps(message, ensure_ascii=True).encode())


@FUZZ
@given(valid_messages)
def test_valid_messages_round_trip_through_encode(message: dict[str, Any]) -> None:
    """A valid frame parses, and its encoding parses back to an equal message."""
    parsed = protocol.parse_agent_message(json.dumps(message))
    assert parsed.type == message["type"]
    assert protocol.parse_agent_message(protocol.encode(parsed)) == parsed
    assert protocol.parse_agent_message(protocol.encode(parsed).encode()) == parsed


@FUZZ
@given(st.text(min_size=1, max_size=protocol.MAX_MESSAGE_BYTES // 4))
def test_frames_near_the_size_limit_are_handled(filler: str) -> None:
    """A frame padded to around the size limit, in a valid field or not, is handled."""
    message = {"type": "status", "state": "ok", "error": filler * 8}
    parses_or_refuses(json.dumps(message)[: protocol.MAX_MESSAGE_BYTES + 10])
    parses_or_refuses(json.dumps(message))


def agrees_with_the_union(raw: str | bytes) -> None:
    """The status fast path changes nothing: the same message, or the same refusal."""
    try:
        expected: object = protocol._parse(protocol._agent_message, raw)
    except protocol.ProtocolError as error:
        expected = str(error)
    try:
        found: object = protocol.parse_agent_message(raw)
    except protocol.ProtocolError as error:
        found = str(error)
    assert found == expected
    assert type(found) is type(expected)


@FUZZ
@given(valid_messages.flatmap(mutated) | valid_messages)
def test_statuses_parse_as_the_tagged_union_parses_them(message: dict[str, Any]) -> None:
    """Valid or mutated, a frame parses to what the union makes of it, or fails as it does."""
    agrees_with_the_union(json.dumps(message))
    agrees_with_the_union(
        json.dumps({key: value for key, value in message.items() if key != "type"})
    )
