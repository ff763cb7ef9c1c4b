"""Cache reports: llama.cpp's ``timings`` read back from the tail of a relayed response."""

from __future__ import annotations

import json

import pytest

from paddler.balancer.routing.cache_report import TAIL_BYTES, CacheReport, ResponseTail

# Response shapes captured from llama.cpp (b-series, via xllamacpp).
CHAT_BODY = (
    b'{"choices": [{"finish_reason": "length", "index": 0, "message": {"role": "assistant", '
    b'"content": "The capital of France is Paris"}}], "created": 1795349940, "model": "m", '
    b'"system_fingerprint": "b0-unknown", "object": "chat.completion", '
    b'"usage": {"completion_tokens": 8, "prompt_tokens": 1593, "total_tokens": 1601, '
    b'"prompt_tokens_details": {"cached_tokens": 0}}, "id": "chatcmpl-x", '
    b'"timings": {"cache_n": 0, "prompt_n": 1593, "prompt_ms": 1025.734, '
    b'"prompt_per_token_ms": 0.64, "prompt_per_second": 1553.03, "predicted_n": 8, '
    b'"predicted_ms": 67.19, "predicted_per_token_ms": 9.59, "predicted_per_second": 104.18}}'
)

STREAM_END = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795349947,'
    b'"id":"chatcmpl-L","model":"m","system_fingerprint":"b0-unknown",'
    b'"object":"chat.completion.chunk","timings":{"cache_n":1592,"prompt_n":1,"prompt_ms":9.855,'
    b'"prompt_per_token_ms":9.855,"prompt_per_second":101.47,"predicted_n":8,'
    b'"predicted_ms":56.295,"predicted_per_token_ms":8.04,"predicted_per_second":124.34}}\n\n'
    b"data: [DONE]\n\n"
)


def content_event(text: str) -> bytes:
    """A streamed delta as llama.cpp sends it before the last event."""
    event = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": text}}],
        "created": 1795349947,
        "id": "chatcmpl-L",
        "model": "m",
        "system_fingerprint": "b0-unknown",
        "object": "chat.completion.chunk",
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


STREAM = b"".join(content_event(word) for word in ("The", " capital", " is", " Paris")) + STREAM_END


def report_of(*chunks: bytes) -> CacheReport | None:
    tail = ResponseTail()
    for chunk in chunks:
        tail.feed(chunk)
    return tail.cache_report()


def assert_report(report: CacheReport | None, cached: int, computed: int, seconds: float) -> None:
    assert report is not None
    assert (report.cached_tokens, report.computed_tokens) == (cached, computed)
    assert report.prompt_seconds == pytest.approx(seconds)


def test_a_json_body_reports_its_timings() -> None:
    """A non-streamed chat completion: nothing cached, every prompt token computed."""
    report = report_of(CHAT_BODY)
    assert_report(report, cached=0, computed=1593, seconds=1.025734)
    assert report is not None
    assert report.prompt_tokens == 1593


def test_a_stream_reports_the_timings_of_its_last_event() -> None:
    """A streamed chat completion: all but one prompt token came from the cache."""
    report = report_of(STREAM)
    assert_report(report, cached=1592, computed=1, seconds=0.009855)
    assert report is not None
    assert report.prompt_tokens == 1593


def test_a_stream_split_at_any_byte_gives_the_same_report() -> None:
    """Chunk boundaries never matter, wherever the network cuts the stream."""
    whole = report_of(STREAM)
    assert whole is not None
    for cut in range(len(STREAM) + 1):
        assert report_of(STREAM[:cut], STREAM[cut:]) == whole, cut


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_a_stream_fed_in_small_chunks_gives_the_same_report(size: int) -> None:
    """Many small chunks add up to the same tail as one large one."""
    chunks = [STREAM[start : start + size] for start in range(0, len(STREAM), size)]
    assert report_of(*chunks) == report_of(STREAM)
    assert_report(report_of(*chunks), cached=1592, computed=1, seconds=0.009855)


def test_a_long_body_before_the_timings_is_no_obstacle() -> None:
    """Only the tail is kept, and the timings are in it."""
    long_text = "word " * (10 * TAIL_BYTES)
    body = CHAT_BODY.replace(b"The capital of France is Paris", long_text.encode())
    assert len(body) > 10 * TAIL_BYTES
    assert_report(report_of(body), cached=0, computed=1593, seconds=1.025734)
    chunks = [body[start : start + 1000] for start in range(0, len(body), 1000)]
    assert_report(report_of(*chunks), cached=0, computed=1593, seconds=1.025734)


def test_a_long_stream_before_the_last_event_is_no_obstacle() -> None:
    """Thousands of delta events before the last one do not push its timings out."""
    events = [content_event(f" token{index}") for index in range(5000)]
    assert sum(map(len, events)) > 10 * TAIL_BYTES
    assert_report(report_of(*events, STREAM_END), cached=1592, computed=1, seconds=0.009855)


def test_a_response_without_timings_reports_nothing() -> None:
    """No ``timings`` object, no report."""
    without = CHAT_BODY[: CHAT_BODY.index(b', "timings"')] + b"}"
    assert json.loads(without)["id"] == "chatcmpl-x"
    assert report_of(without) is None
    assert report_of(b"".join(content_event("x") for _ in range(3))) is None
    assert report_of() is None


@pytest.mark.parametrize(
    "end",
    [b'"timings":{"cache_n":1592,"prompt_n":1,"prompt_ms":9.8', b'"timings":{"cache_n":15'],
    ids=["after-fields", "mid-number"],
)
def test_a_truncated_timings_object_reports_nothing(end: bytes) -> None:
    """A response cut inside its timings object gives no report, not a wrong one."""
    cut = STREAM_END[: STREAM_END.index(b'"timings"')] + end
    assert report_of(*(content_event("x") for _ in range(3)), cut) is None


def test_timings_missing_a_count_report_nothing() -> None:
    """Without ``cache_n`` (older llama.cpp) there is nothing to learn from."""
    older = STREAM_END.replace(b'"cache_n":1592,', b"")
    assert report_of(older) is None


def test_the_last_timings_object_wins() -> None:
    """With per-token timings every event carries some; the last one counts."""
    final = STREAM_END.replace(b"data: [DONE]\n\n", b"")
    earlier = final.replace(b'"cache_n":1592,"prompt_n":1', b'"cache_n":7,"prompt_n":1586')
    assert_report(report_of(earlier), cached=7, computed=1586, seconds=0.009855)
    assert_report(report_of(earlier, STREAM_END), cached=1592, computed=1, seconds=0.009855)
    assert_report(report_of(final, earlier), cached=7, computed=1586, seconds=0.009855)


def test_generated_text_that_looks_like_timings_is_not_mistaken_for_them() -> None:
    """A model writing a timings object produces escaped quotes, which never match."""
    echo = content_event('"timings": {"cache_n": 99, "prompt_n": 1, "prompt_ms": 2}')
    assert report_of(echo) is None
    assert_report(report_of(echo, STREAM_END), cached=1592, computed=1, seconds=0.009855)


def test_timings_in_another_order_or_spacing_report_the_same() -> None:
    """llama.cpp writes cache_n, prompt_n, prompt_ms first; any order or spacing reads alike."""
    for timings in (
        b'"timings":{"cache_n":7,"prompt_n":3,"prompt_ms":12.5,"predicted_n":4}',
        b'"timings" : { "prompt_ms" : 12.5 , "prompt_n" : 3, "cache_n" : 7 }',
        b'"timings":{"predicted_n":4,"prompt_n":3,"cache_n":7,"prompt_ms":1.25e1}',
    ):
        assert_report(report_of(b'{"content":"x",' + timings + b"}"), 7, 3, 0.0125)


def test_a_first_chunk_is_kept_whole_and_later_ones_after_it() -> None:
    """The first chunk is kept without a copy; what follows is appended to it."""
    assert_report(
        report_of(b'{"timings":{"cache_n":1,', b'"prompt_n":2,"prompt_ms":3}}'), 1, 2, 0.003
    )
    assert_report(report_of(b"x" * 20_000 + CHAT_BODY), 0, 1593, 1.025734)
