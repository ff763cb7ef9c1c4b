"""``upstream.end_to_end``: what of a message's head crosses the proxy."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from paddler.balancer.proxy.upstream import end_to_end


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    """RFC 9110's hop-by-hop headers, the framing ones, and any named by Connection (in any
    case, between commas) stay behind; every other header crosses in order, repeats kept."""
    forwarded = end_to_end(
        _headers(
            ("Host", "balancer:8086"),
            ("connection", "keep-alive, X-Trace-Hop ,  upgrade"),
            ("X-Custom", "one"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "12"),
            ("x-trace-hop", "dropped"),
            ("X-Custom", "two"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "secret"),
            ("Content-Type", "application/json"),
        )
    )
    assert list(forwarded.items()) == [
        ("Host", "balancer:8086"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Content-Type", "application/json"),
    ]


def test_a_head_with_nothing_to_drop_crosses_whole_and_is_a_copy() -> None:
    """The result is a new multidict: changing it leaves the message's own head alone."""
    original = _headers(("Content-Type", "text/event-stream"), ("Server", "llama.cpp"))
    forwarded = end_to_end(original)
    assert list(forwarded.items()) == list(original.items())
    forwarded["X-Request-Id"] = "r1"
    assert "X-Request-Id" not in original
