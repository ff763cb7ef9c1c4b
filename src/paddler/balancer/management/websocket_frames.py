"""RFC 6455 frames as a server reads them from a client, and the few it writes back.

``FrameParser`` turns the bytes of a client's connection into whole messages: it checks every
frame header (client frames masked, no reserved bits, since no extension is negotiated, known
opcodes, control frames whole and at most 125 bytes), unmasks, reassembles fragmented messages
and bounds each message by ``max_message`` bytes, refusing a frame that announces more before
reading its payload. A violation is a ``FrameError`` carrying the close code RFC 6455 §7.4
gives it (1002 protocol error, 1007 text that is not UTF-8, 1009 too big), as aiohttp's own
reader uses them. The ``*_frame`` functions build the server's frames, which are not masked.

Hand-written for ``agent_connection`` (see there for the measurement that justifies it): what
aiohttp's reader adds beyond this is per-message-deflate, which the agents' socket does not
negotiate.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
"""The opcodes, as plain ints: an enum's constructor costs more than a frame's header."""


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_TEXT = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009


_KNOWN = tuple(code in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG) for code in range(16))
_CONTROL_MAX = 125


class FrameError(ValueError):
    """The peer broke the protocol: close the connection with ``code``."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(mask: bytes, payload: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask``, as one big-integer XOR (about 1 µs for
    an agent's 150-byte report; a byte loop is 15)."""
    size = len(payload)
    if not size:
        return payload
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


class FrameParser:
    """Whole messages out of a client's bytes: ``feed`` them, then call ``next`` until None."""

    __slots__ = (
        "_buffer",
        "_fragmented",
        "_fragments",
        "_fragments_size",
        "_max_message",
        "_position",
    )

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        self._buffer = b""
        self._position = 0
        self._fragments: list[bytes] | None = None
        """The payloads so far of a fragmented message, whose opcode is ``_fragmented``."""
        self._fragmented = TEXT
        self._fragments_size = 0

    def feed(self, data: bytes) -> None:
        if self._position >= len(self._buffer):
            self._buffer = data
        else:
            self._buffer = self._buffer[self._position :] + data
        self._position = 0

    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a message."""
        return len(self._buffer) - self._position + self._fragments_size

    def next(self) -> tuple[int, bytes] | None:
        """The next whole message (control frames included) as its opcode and payload, or
        None until more bytes come.

        Raises ``FrameError``; after that the parser is not to be used again.
        """
        while True:
            buffer = self._buffer
            start = self._position
            available = len(buffer) - start
            if available < 2:
                return None
            first = buffer[start]
            second = buffer[start + 1]
            if first & 0x70 or not second & 0x80 or not _KNOWN[first & 0x0F]:
                raise _bad_header(first, second)
            size = second & 0x7F
            if size < 126:
                mask_at = start + 2
            elif size == 126:
                if available < 4:
                    return None
                (size,) = struct.unpack_from("!H", buffer, start + 2)
                mask_at = start + 4
            else:
                if available < 10:
                    return None
                (size,) = struct.unpack_from("!Q", buffer, start + 2)
                mask_at = start + 10
            opcode = first & 0x0F
            if opcode >= CLOSE:
                if not first & 0x80 or size > _CONTROL_MAX:
                    raise FrameError(
                        CloseCode.PROTOCOL_ERROR, "a control frame must be whole and ≤ 125 bytes"
                    )
            elif self._fragments_size + size > self._max_message:
                raise FrameError(
                    CloseCode.MESSAGE_TOO_BIG, f"message is larger than {self._max_message} bytes"
                )
            end = mask_at + 4 + size
            if len(buffer) < end:
                return None
            self._position = end
            payload = unmask(buffer[mask_at : mask_at + 4], buffer[mask_at + 4 : end])
            if opcode >= CLOSE:
                return opcode, payload
            fragments = self._fragments
            if fragments is None:
                if opcode == CONTINUATION:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "a continuation of nothing")
                if first & 0x80:
                    return opcode, payload
                self._fragmented = opcode
                self._fragments = [payload]
                self._fragments_size = size
                continue
            if opcode != CONTINUATION:
                raise FrameError(
                    CloseCode.PROTOCOL_ERROR, "a new message before the last one ended"
                )
            fragments.append(payload)
            self._fragments_size += size
            if first & 0x80:
                self._fragments = None
                self._fragments_size = 0
                return self._fragmented, b"".join(fragments)


def _bad_header(first: int, second: int) -> FrameError:
    if first & 0x70:
        return FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension)")
    if not second & 0x80:
        return FrameError(CloseCode.PROTOCOL_ERROR, "a client's frame must be masked")
    return FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {first & 0x0F:#x}")


def close_reason(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005, "" for an empty one)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "a close frame's code needs two bytes")
    try:
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CloseCode.INVALID_TEXT, "a close reason that is not UTF-8") from None


def _frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def text_frame(text: str) -> bytes:
    return _frame(TEXT, text.encode())


def pong_frame(payload: bytes) -> bytes:
    return _frame(PONG, payload)


def close_frame(code: int, reason: str) -> bytes:
    """A close frame; the reason is cut to fit a control frame's 125 bytes."""
    encoded = reason.encode()[: _CONTROL_MAX - 2].decode(errors="ignore").encode()
    return _frame(CLOSE, code.to_bytes(2, "big") + encoded)
