"""The bytes a llama.cpp server sends, for the fast fake upstream to send the same.

Recorded from llama.cpp's own HTTP server (xllamacpp, the tiny model) with a raw socket:

- every answer carries ``Server: llama.cpp`` and ``Access-Control-Allow-Origin:``; a JSON answer
  has ``Content-Type: application/json; charset=utf-8`` and a ``Content-Length``;
- keep-alive: ``Keep-Alive: timeout=5, max=100``; the 100th answer on a connection says
  ``Connection: close`` and the server closes it; an idle connection is closed after 5 s;
- a stream: ``Content-Type: text/event-stream``, ``X-Accel-Buffering: no``, ``Transfer-Encoding:
  chunked``, headers only with the first token; one HTTP chunk per event ``data: {...}\\n\\n``;
  the native ``/completion`` ends with an event with ``"stop": true``, the settings and
  ``timings`` (about 1.7 KB), OpenAI routes with ``data: [DONE]``; then the last chunk
  ``0\\r\\n\\r\\n``, and the server closes the connection although its headers said keep-alive;
- a non-streamed ``/completion`` answer is about 1.7 KB of JSON (the same final object);
- ``/props`` about 2 KB with ``total_slots``; ``/slots`` one object per slot.

The large parts are rendered once: only the counters change per answer.
"""

from __future__ import annotations

import json
from typing import Any

MODEL = "fake-model"
READ_ME = b"Server: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
KEEP_ALIVE = b"Keep-Alive: timeout=5, max=100\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE_SECONDS = 5.0
KEEP_ALIVE_MAX = 100

_SETTINGS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "dry_sequence_breakers": ["\n", ":", '"', "*"],
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "stop": [],
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": True,
    "n_probs": 0,
    "min_keep": 0,
    "grammar": "",
    "chat_format": "Content-only",
    "reasoning_format": "deepseek",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc"],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "lora": [],
}
_SETTINGS_JSON = json.dumps(_SETTINGS, separators=(",", ":"))


def head(status: str, content_type: bytes, *, length: int | None, close: bool) -> bytes:
    framing = (
        b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    )
    extra = b"X-Accel-Buffering: no\r\n" if length is None else b""
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n" + READ_ME + extra
        + b"Content-Type: " + content_type + b"\r\n" + framing
        + (CLOSE if close else KEEP_ALIVE) + b"\r\n"
    )  # fmt: skip


JSON = b"application/json; charset=utf-8"
EVENT_STREAM = b"text/event-stream"


def json_answer(status: str, body: bytes, *, close: bool) -> bytes:
    return head(status, JSON, length=len(body), close=close) + body


def error_body(code: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "type": kind}}).encode()


def props(total_slots: int, n_ctx: int) -> bytes:
    return json.dumps(
        {
            "default_generation_settings": {"params": _SETTINGS, "n_ctx": n_ctx},
            "total_slots": total_slots,
            "model_alias": MODEL,
            "model_path": f"/models/{MODEL}.gguf",
            "endpoint_slots": True,
            "endpoint_metrics": False,
            "build_info": "fast-upstream",
            "is_sleeping": False,
        }
    ).encode()


def slots(total_slots: int, busy: int, n_ctx: int) -> bytes:
    return json.dumps(
        [
            {"id": slot, "n_ctx": n_ctx, "speculative": False, "is_processing": slot < busy}
            for slot in range(total_slots)
        ]
    ).encode()


def models() -> bytes:
    return json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "llamacpp"}]}
    ).encode()


def final(tokens: int, slot: int, stream: bool) -> bytes:
    """The last object of a native completion: stop, settings and timings."""
    return (
        f'{{"index":0,"content":"","tokens":[],"id_slot":{slot},"stop":true,'
        f'"model":"/models/{MODEL}.gguf","tokens_predicted":{tokens},"tokens_evaluated":13,'
        f'"generation_settings":{_SETTINGS_JSON[:-1]},"n_predict":{tokens},'
        f'"stream":{"true" if stream else "false"}}},"prompt":"<s> hello","has_new_line":false,'
        f'"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":{13 + tokens},'
        f'"timings":{{"cache_n":0,"prompt_n":13,"prompt_ms":0.55,"prompt_per_token_ms":0.042,'
        f'"prompt_per_second":23297.4,"predicted_n":{tokens},"predicted_ms":0.32,'
        f'"predicted_per_token_ms":0.1,"predicted_per_second":9375.0}}}}'
    ).encode()


def token_event(number: int) -> bytes:
    """One streamed token of a native completion, framed as its own HTTP chunk."""
    return chunk(
        b'data: {"index":0,"content":"x","tokens":[70],"stop":false,"id_slot":-1,'
        b'"tokens_predicted":%d,"tokens_evaluated":13}\n\n' % number
    )


def chat_event(number: int, last: bool) -> bytes:
    """One streamed token of ``/v1/chat/completions`` (the last one says ``finish_reason``)."""
    delta, reason = (b"{}", b'"length"') if last else (b'{"content":"x"}', b"null")
    return chunk(
        b'data: {"choices":[{"finish_reason":%s,"index":0,"delta":%s}],"created":1796132051,'
        b'"id":"chatcmpl-%d","model":"%s","object":"chat.completion.chunk"}\n\n'
        % (reason, delta, number, MODEL.encode())
    )


def chat_answer(tokens: int) -> bytes:
    return json.dumps(
        {
            "choices": [
                {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": "x" * tokens}}
            ],
            "model": MODEL,
            "object": "chat.completion",
            "usage": {"completion_tokens": tokens, "prompt_tokens": 13, "total_tokens": 13 + tokens},
        }
    ).encode()  # fmt: skip


DONE = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
