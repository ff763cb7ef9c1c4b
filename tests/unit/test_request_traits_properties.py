"""Properties of the request-traits reader over arbitrary JSON and bytes, huge and deep."""

from __future__ import annotations

import json
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler.balancer.routing.prefix_index import PROMPT_CHARS
from paddler.balancer.routing.request_traits import NO_TRAITS, RequestTraits, _parsed, inspect

PATHS = st.sampled_from(
    ["/v1/chat/completions", "/completion", "/v1/completions", "/v1/responses", "/v1/messages"]
)
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]) | JSON, "content": JSON}
)
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text() | JSON,
        "messages": st.lists(MESSAGE, max_size=5) | JSON,
        "prompt": st.text() | st.lists(st.integers(0, 10**6), max_size=5) | JSON,
        "input": st.text() | st.lists(MESSAGE, max_size=3) | JSON,
        "tools": JSON,
        "system": JSON,
        "instructions": JSON,
    },
)


def well_formed(traits: object, document: Any = ..., query_model: str | None = None) -> None:
    """Traits as routing expects them; with ``document``, a model that it (or the query) names."""
    assert isinstance(traits, RequestTraits)
    if traits.model is not None:
        assert isinstance(traits.model, str)
        if document is not ...:
            named = document.get("model") if isinstance(document, dict) else None
            assert traits.model in (named, query_model)
    if traits.prompt is None:
        assert traits.prompt_chars == 0
    else:
        assert 0 < len(traits.prompt) <= PROMPT_CHARS
        assert traits.prompt_chars >= len(traits.prompt)


@given(path=PATHS, document=DOCUMENT, query_model=st.none() | st.text(min_size=1))
def test_any_json_request_yields_traits_named_in_the_document(
    path: str, document: dict[str, Any], query_model: str | None
) -> None:
    """Any JSON body yields well-formed traits, and its model is the one the body or query names."""
    query = {"model": query_model} if query_model else {}
    traits = inspect("POST", path, query, json.dumps(document).encode())
    well_formed(traits, document, query_model)
    if isinstance(document.get("model"), str) and document["model"]:
        assert traits.model == document["model"]


@given(path=PATHS, value=JSON)
def test_any_json_value_yields_well_formed_traits(path: str, value: Any) -> None:
    """A body that is any JSON value (an array, a number, a string) never makes the reader fail."""
    well_formed(inspect("POST", path, {}, json.dumps(value).encode()), value)


@given(path=PATHS, body=st.binary(max_size=2000))
def test_arbitrary_bytes_yield_well_formed_traits(path: str, body: bytes) -> None:
    """Bytes that are not JSON (invalid UTF-8 included) never make the reader fail."""
    well_formed(inspect("POST", path, {}, body))


@settings(max_examples=20, deadline=None)
@given(
    depth=st.integers(sys.getrecursionlimit(), 200_000),
    opening=st.sampled_from(["[", '{"a":']),
    inside_messages=st.booleans(),
)
def test_nesting_far_past_the_recursion_limit_yields_no_traits(
    depth: int, opening: str, inside_messages: bool
) -> None:
    """Nesting never makes the reader fail; past twice the recursion limit it yields no traits
    (the parser stops there, so the body is not JSON to it)."""
    closing = "]" if opening == "[" else "}"
    deep = opening * depth + "0" + closing * depth
    if inside_messages:
        deep = '{"model":"m","messages":[{"role":"user","content":' + deep + "}]}"
    traits = inspect("POST", "/v1/chat/completions", {}, deep.encode())
    well_formed(traits)
    if depth > 2 * sys.getrecursionlimit():
        assert traits == NO_TRAITS
    else:
        assert traits == NO_TRAITS or traits.model == ("m" if inside_messages else None)


@settings(max_examples=20, deadline=None)
@given(
    chars=st.integers(PROMPT_CHARS - 300, 4 * PROMPT_CHARS),
    messages=st.integers(1, 4),
    model_last=st.booleans(),
)
def test_a_huge_prompt_is_cut_to_what_the_index_reads_and_its_length_kept(
    chars: int, messages: int, model_last: bool
) -> None:
    """However long the prompt, routing gets at most PROMPT_CHARS of it, and its whole length."""
    parts = [f'{{"role":"user","content":"{"a" * chars}"}}'] * messages
    fields = ['"messages":[' + ",".join(parts) + "]", '"model":"m"']
    if not model_last:
        fields.reverse()
    traits = inspect("POST", "/v1/chat/completions", {}, ("{" + ",".join(fields) + "}").encode())
    well_formed(traits)
    assert traits.model == "m"
    assert traits.prompt is not None
    whole = messages * (len("user\x1f\x1e") + chars)
    assert traits.prompt_chars == whole
    assert len(traits.prompt) == min(whole, PROMPT_CHARS)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=50)
@given(count=st.integers(1, 50_000))
def test_many_small_messages_are_read_whole(count: int) -> None:
    """A body of many small objects, the model after them, is read: model and bounded prompt."""
    body = b'{"messages":[' + b",".join([b'{"content":""}'] * count) + b'],"model":"m"}'
    traits = inspect("POST", "/v1/chat/completions", {}, body)
    well_formed(traits)
    assert traits.model == "m"
    assert traits.prompt_chars == 2 * count


def _loaded(read: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "document", read(body)
    except (ValueError, RecursionError):
        return "refused", None


@given(
    document=JSON,
    before=st.sampled_from(["", " ", "\n"]),
    after=st.sampled_from(["", " \r\n\t", " x", "\x0b", "}", "{}"]),
    encoding=st.sampled_from(["utf-8", "utf-16-le", "utf-32-be"]),
)
def test_a_body_is_read_as_json_loads_reads_it(
    document: Any, before: str, after: str, encoding: str
) -> None:
    """The quick parse of a ``{`` body accepts and refuses exactly what ``json.loads`` does,
    trailing data and other encodings included."""
    body = (before + json.dumps(document) + after).encode(encoding)
    assert _loaded(_parsed, body) == _loaded(json.loads, body)


@given(body=st.binary(max_size=64).map(lambda tail: b"{" + tail))
def test_any_bytes_after_a_brace_are_read_as_json_loads_reads_them(body: bytes) -> None:
    """Bytes that only start like a JSON object: the same document, or the same refusal."""
    assert _loaded(_parsed, body) == _loaded(json.loads, body)


@given(path=PATHS, document=DOCUMENT, query_model=st.none() | st.text(min_size=1))
def test_without_prompts_only_the_model_is_read(
    path: str, document: dict[str, Any], query_model: str | None
) -> None:
    """A balancer that does not route by prefix gets the same model and no prompt text."""
    body = json.dumps(document).encode()
    query = {"model": query_model} if query_model else {}
    traits = inspect("POST", path, query, body, prompts=False)
    assert traits == RequestTraits(model=inspect("POST", path, query, body).model)
