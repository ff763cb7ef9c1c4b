"""The hand-written proxy server's answers as bytes, without sockets."""

from __future__ import annotations

from multidict import CIMultiDict

from paddler.balancer.proxy.client_exchange import Answer
from paddler.balancer.proxy.proxy_http.response import whole


def test_a_whole_answer_is_one_head_with_its_length_then_its_body() -> None:
    """Status line, the answer's headers, its Content-Length, a blank line, then the body."""
    answer = Answer(200, b'{"a": 1}', CIMultiDict({"Content-Type": "application/json"}))
    assert whole(answer, "POST", keep_alive=True) == (
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"a": 1}'
    )


def test_an_answer_to_head_keeps_its_length_and_drops_its_body() -> None:
    """HEAD gets the Content-Length that GET would have, and no body."""
    assert whole(Answer(200, b"12345"), "HEAD", keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    )


def test_a_204_has_neither_length_nor_body_and_a_closing_answer_says_so() -> None:
    """No Content-Length on a 204; Connection: close when the connection ends after it."""
    assert whole(Answer(204, b"ignored", reason="Nothing"), "GET", keep_alive=False) == (
        b"HTTP/1.1 204 Nothing\r\nConnection: close\r\n\r\n"
    )
