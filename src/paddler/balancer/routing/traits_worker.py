"""The request-traits worker: a child process of the balancer that reads large bodies' traits.

Run as ``python -m paddler.balancer.routing.traits_worker`` by ``traits_reader``, never by hand. It reads
requests from stdin and writes answers to stdout, one at a time, in order, in frames:

- request: ``>IQ`` (header length, body length), the header (JSON: ``method``, ``path``,
  ``model``, the query's ``?model=`` or null), then the body;
- answer: ``>I`` (length), then JSON: the fields of ``RequestTraits``.

It lives exactly as long as the pipe to it: end of stdin (the balancer closed it, or died, even by
SIGKILL: nothing else holds that pipe) ends it. Ctrl-C in a terminal reaches the whole process
group; the worker ignores it and lets the balancer decide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import struct
import sys
from typing import BinaryIO

from paddler.balancer.routing.request_traits import NO_TRAITS, inspect

REQUEST_HEAD = struct.Struct(">IQ")
ANSWER_HEAD = struct.Struct(">I")


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if data is None or len(data) < size:
        return None
    return data


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer requests until ``requests`` ends."""
    while True:
        head = _read_exactly(requests, REQUEST_HEAD.size)
        if head is None:
            return
        header_size, body_size = REQUEST_HEAD.unpack(head)
        header_bytes = _read_exactly(requests, header_size)
        body = _read_exactly(requests, body_size)
        if header_bytes is None or body is None:
            return
        header = json.loads(header_bytes)
        model = header.get("model")
        try:
            traits = inspect(
                header["method"], header["path"], {"model": model} if model else {}, body
            )
        except Exception:  # inspect promises not to raise; if it ever does, no traits
            traits = NO_TRAITS
        del body
        answer = json.dumps(dataclasses.asdict(traits)).encode()
        answers.write(ANSWER_HEAD.pack(len(answer)) + answer)
        answers.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError):  # the balancer is gone
        serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
