"""The agents' socket's frame parser: whole messages out of a client's bytes, and every
violation refused with the close code RFC 6455 gives it."""

from __future__ import annotations

import os
import struct

import pytest

from paddler.balancer.management.websocket_frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    CloseCode,
    FrameError,
    FrameParser,
    close_frame,
    close_reason,
    text_frame,
    unmask,
)
from tests.support.websocket import client_frame


def messages(parser: FrameParser, data: bytes) -> list[tuple[int, bytes]]:
    parser.feed(data)
    found = []
    while (message := parser.next()) is not None:
        found.append(message)
    return found


def test_unmasking_is_the_repeated_key_xored_byte_by_byte() -> None:
    """``unmask`` agrees with the RFC's definition, and undoes itself."""
    mask, payload = os.urandom(4), os.urandom(1001)
    expected = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    assert unmask(mask, payload) == expected
    assert unmask(mask, expected) == payload
    assert unmask(mask, b"") == b""


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_a_masked_text_frame_of_any_length_is_one_message(size: int) -> None:
    """7-bit, 16-bit and 64-bit lengths all read back the payload."""
    payload = os.urandom(size)
    assert messages(FrameParser(1 << 20), client_frame(TEXT, payload)) == [(TEXT, payload)]


def test_frames_split_anywhere_and_run_together_read_back_in_order() -> None:
    """Bytes fed one at a time, or many frames in one read, give the same messages."""
    frames = [client_frame(TEXT, f"report {n}".encode()) for n in range(5)]
    frames.append(client_frame(PING, b"hi"))
    stream = b"".join(frames)
    expected = [(TEXT, f"report {n}".encode()) for n in range(5)] + [(PING, b"hi")]
    assert messages(FrameParser(1024), stream) == expected
    parser = FrameParser(1024)
    found = []
    for byte in stream:
        found.extend(messages(parser, bytes((byte,))))
    assert found == expected
    assert parser.buffered() == 0


def test_a_fragmented_message_is_reassembled_with_pings_between_its_fragments() -> None:
    """A control frame may come between fragments; the message keeps its first opcode."""
    stream = (
        client_frame(TEXT, b'{"a": ', final=False)
        + client_frame(PING, b"")
        + client_frame(CONTINUATION, b"1", final=False)
        + client_frame(CONTINUATION, b"}")
    )
    assert messages(FrameParser(1024), stream) == [(PING, b""), (TEXT, b'{"a": 1}')]


@pytest.mark.parametrize(
    ("stream", "code", "complaint"),
    [
        (client_frame(TEXT, b"x", masked=False), CloseCode.PROTOCOL_ERROR, "masked"),
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", CloseCode.PROTOCOL_ERROR, "reserved bits"),
        (client_frame(0x3, b""), CloseCode.PROTOCOL_ERROR, "unknown opcode"),
        (client_frame(PING, b"x" * 126), CloseCode.PROTOCOL_ERROR, "control frame"),
        (client_frame(PING, b"", final=False), CloseCode.PROTOCOL_ERROR, "control frame"),
        (client_frame(CONTINUATION, b"x"), CloseCode.PROTOCOL_ERROR, "continuation"),
        (
            client_frame(TEXT, b"x", final=False) + client_frame(TEXT, b"y"),
            CloseCode.PROTOCOL_ERROR,
            "before the last one ended",
        ),
        (client_frame(TEXT, b"x" * 1025), CloseCode.MESSAGE_TOO_BIG, "larger than 1024"),
        (
            client_frame(TEXT, b"x" * 600, final=False) + client_frame(CONTINUATION, b"y" * 600),
            CloseCode.MESSAGE_TOO_BIG,
            "larger than 1024",
        ),
    ],
)
def test_a_broken_frame_is_refused_with_its_close_code(
    stream: bytes, code: CloseCode, complaint: str
) -> None:
    """Unmasked, reserved bits, unknown opcodes, long or fragmented control frames, stray
    continuations, interleaved messages and oversized messages all raise ``FrameError``."""
    with pytest.raises(FrameError) as refused:
        messages(FrameParser(1024), stream)
    assert refused.value.code == code
    assert complaint in refused.value.reason


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    """A frame announcing more than the limit is refused before its payload arrives."""
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 40)
    with pytest.raises(FrameError) as refused:
        messages(FrameParser(1024), header)
    assert refused.value.code == CloseCode.MESSAGE_TOO_BIG


def test_a_binary_message_is_returned_as_binary() -> None:
    """What to do with binary is the caller's business; the parser names it."""
    assert messages(FrameParser(1024), client_frame(BINARY, b"\0")) == [(BINARY, b"\0")]


def test_close_payloads_carry_a_code_and_a_utf8_reason() -> None:
    """An empty close is 1005; one byte, or a reason that is not UTF-8, is refused."""
    assert close_reason(b"") == (1005, "")
    assert close_reason(b"\x03\xe8bye") == (1000, "bye")
    with pytest.raises(FrameError):
        close_reason(b"\x03")
    with pytest.raises(FrameError) as refused:
        close_reason(b"\x03\xe8\xff")
    assert refused.value.code == CloseCode.INVALID_TEXT


def test_server_frames_are_unmasked_and_a_close_reason_fits_a_control_frame() -> None:
    """A text frame is FIN + opcode, length, payload; a close frame never exceeds 125 bytes."""
    assert text_frame("hi") == b"\x81\x02hi"
    assert text_frame("x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    closing = close_frame(1008, "é" * 200)
    assert closing[0] == 0x80 | CLOSE
    assert closing[1] <= 125
    assert close_reason(closing[2:])[0] == 1008
