"""Request traits: the model a request names and the prompt text routing indexes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from paddler.balancer.routing.request_traits import NO_TRAITS, RequestTraits, inspect

SYSTEM = {"role": "system", "content": "You are terse."}
FIRST = {"role": "user", "content": "What is a radix tree?"}
ANSWER = {"role": "assistant", "content": "A compressed trie."}
SECOND = {"role": "user", "content": "And a hashed one?"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def post(path: str, document: Any, query: dict[str, str] | None = None) -> RequestTraits:
    return inspect("POST", path, query or {}, json.dumps(document).encode())


def prompt_of(path: str, document: Any) -> str:
    prompt = post(path, document).prompt
    assert prompt is not None
    return prompt


def chat(*messages: dict[str, Any], **extra: Any) -> str:
    return prompt_of("/v1/chat/completions", {"model": "m", "messages": list(messages), **extra})


# -- model ---------------------------------------------------------------------------------------


def test_model_is_read_from_a_json_body() -> None:
    """A POST body's ``model`` is the request's model."""
    assert post("/v1/chat/completions", {"model": "qwen", "messages": [FIRST]}).model == "qwen"


def test_model_of_a_get_is_read_from_the_query() -> None:
    """A GET names its model with ``?model=``; without one it names none."""
    assert inspect("GET", "/v1/models", {"model": "qwen"}, b"").model == "qwen"
    assert inspect("GET", "/v1/models", {}, b"") == NO_TRAITS
    assert inspect("GET", "/v1/models", {"model": ""}, b"").model is None


def test_model_in_a_post_body_wins_over_the_query() -> None:
    """When both name a model, the body's counts."""
    traits = post("/v1/chat/completions", {"model": "body", "messages": []}, {"model": "query"})
    assert traits.model == "body"


def test_model_falls_back_to_the_query_when_the_body_names_none() -> None:
    """A body without a usable ``model`` string leaves the query's model in charge."""
    assert post("/completion", {"prompt": "x"}, {"model": "query"}).model == "query"
    assert post("/completion", {"model": 5, "prompt": "x"}, {"model": "query"}).model == "query"
    assert post("/completion", {"model": "", "prompt": "x"}).model is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"model": "m", "messages": [',
        b'{"model": "\xff\xfe"}',
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b"42",
    ],
    ids=["text", "truncated", "bad-utf8", "array", "string", "null", "number"],
)
def test_a_body_that_is_not_a_json_object_yields_no_traits(body: bytes) -> None:
    """Malformed bodies are llama.cpp's to reject: no model, no prompt, no exception."""
    assert inspect("POST", "/v1/chat/completions", {"model": "q"}, body) == NO_TRAITS


def test_a_deeply_nested_body_yields_no_traits() -> None:
    """Nesting too deep for the JSON parser is still just a body routing cannot read."""
    depth = 100_000
    body = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
    assert inspect("POST", "/v1/chat/completions", {}, body) == NO_TRAITS


def test_fields_of_unexpected_types_yield_no_prompt() -> None:
    """Wrong-typed fields are ignored rather than rejected."""
    assert post("/v1/chat/completions", {"model": "m", "messages": "hi"}).prompt is None
    assert post("/completion", {"prompt": {"text": "hi"}}).prompt is None
    assert post("/completion", {"prompt": [1, "two", 3]}).prompt is None
    assert post("/v1/chat/completions", {"model": "m", "messages": [7, None]}).prompt is None


def test_unknown_paths_have_a_model_but_no_prompt() -> None:
    """Only generation endpoints are indexed."""
    traits = post("/tokenize", {"model": "m", "content": "hello"})
    assert traits == RequestTraits(model="m", prompt=None)


# -- /v1/chat/completions ------------------------------------------------------------------------


def test_chat_prompt_holds_every_message_in_order() -> None:
    """Roles and contents appear in conversation order."""
    prompt = chat(SYSTEM, FIRST, ANSWER)
    positions = [prompt.index(message["content"]) for message in (SYSTEM, FIRST, ANSWER)]
    assert positions == sorted(positions)
    assert prompt.index("system") < prompt.index("user") < prompt.index("assistant")


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/chat/completions", "/v1/chat/completions/"]
)
def test_chat_aliases_give_the_same_prompt(path: str) -> None:
    """The OpenAI path, its unversioned alias and a trailing slash are one endpoint."""
    assert prompt_of(path, {"messages": [SYSTEM, FIRST]}) == chat(SYSTEM, FIRST)


def test_chat_tools_come_before_the_messages() -> None:
    """Templates lay tools out first, so they lead the prompt text."""
    prompt = chat(SYSTEM, FIRST, tools=TOOLS)
    assert prompt.index("lookup_weather") < prompt.index(SYSTEM["content"])
    assert chat(SYSTEM, FIRST, tools=TOOLS) != chat(SYSTEM, FIRST)


def test_chat_multi_part_content_contributes_each_text_part() -> None:
    """Text parts are kept in order; a single text part reads like plain string content."""
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}],
    }
    prompt = chat(parts)
    assert 0 <= prompt.index("first part") < prompt.index("second")
    single = {"role": "user", "content": [{"type": "text", "text": FIRST["content"]}]}
    assert chat(single) == chat(FIRST)


def test_chat_images_stand_in_by_their_data() -> None:
    """The same image gives the same prompt; a different image a different one."""

    def with_image(url: str) -> dict[str, Any]:
        return {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe:"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }

    cat = chat(with_image("data:image/png;base64,Y2F0"))
    assert cat == chat(with_image("data:image/png;base64,Y2F0"))
    assert cat != chat(with_image("data:image/png;base64,ZG9n"))
    assert "Y2F0" in cat


def test_a_continued_conversation_extends_the_earlier_prompt() -> None:
    """The next turn of a chat has the previous turn's prompt text as its prefix."""
    earlier = chat(SYSTEM, FIRST, tools=TOOLS)
    later = chat(SYSTEM, FIRST, ANSWER, SECOND, tools=TOOLS)
    assert later.startswith(earlier)
    assert len(later) > len(earlier)


def test_message_boundaries_prevent_false_sharing() -> None:
    """``"ab"`` then ``"c"`` is not ``"abc"``, and a message is not a prefix of a longer one."""
    split = chat({"role": "user", "content": "ab"}, {"role": "user", "content": "c"})
    joined = chat({"role": "user", "content": "abc"})
    assert split != joined
    assert not joined.startswith(chat({"role": "user", "content": "ab"}))
    assert split != chat({"role": "user", "content": "abuserc"})


def test_roles_are_part_of_the_prompt() -> None:
    """The same words from a different role are a different prompt."""
    assert chat({"role": "user", "content": "hi"}) != chat({"role": "assistant", "content": "hi"})


# -- /completion and /v1/completions -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/completion", "/completions", "/v1/completions"])
def test_completion_string_prompt_is_the_prompt_text(path: str) -> None:
    """A string prompt is indexed as it is."""
    assert prompt_of(path, {"prompt": "Once upon a time"}) == "Once upon a time"


def test_completion_single_item_list_is_its_item() -> None:
    """``["text"]`` and ``[[ids]]`` are one prompt, as llama.cpp reads them."""
    assert prompt_of("/completion", {"prompt": ["Once upon"]}) == "Once upon"
    assert prompt_of("/completion", {"prompt": [[1, 2, 3]]}) == prompt_of(
        "/completion", {"prompt": [1, 2, 3]}
    )


def test_completion_token_ids_share_a_prefix_when_the_ids_do() -> None:
    """A token-id prompt extending another has the other's text as its prefix."""
    shorter = prompt_of("/completion", {"prompt": [15496, 11, 995]})
    longer = prompt_of("/completion", {"prompt": [15496, 11, 995, 0, 42]})
    assert longer.startswith(shorter)
    assert shorter != prompt_of("/completion", {"prompt": [15496, 12, 995]})


def test_completion_token_ids_that_diverge_do_not_share_a_text_prefix() -> None:
    """``[1, 2]`` is not a prefix of ``[1, 23]``, so neither is its text."""
    shorter = prompt_of("/completion", {"prompt": [1, 2]})
    other = prompt_of("/completion", {"prompt": [1, 23]})
    assert not other.startswith(shorter)


# -- /v1/responses --------------------------------------------------------------------------------


def test_responses_prompt_is_instructions_then_input() -> None:
    """Instructions lead, the input string follows."""
    prompt = prompt_of(
        "/v1/responses", {"model": "m", "instructions": "Be terse.", "input": "Hello there"}
    )
    assert 0 <= prompt.index("Be terse.") < prompt.index("Hello there")


def test_responses_input_string_reads_as_a_user_message() -> None:
    """A bare input string and a one-message input list are the same prompt."""
    as_string = prompt_of("/v1/responses", {"instructions": "I", "input": "Hello"})
    as_messages = prompt_of(
        "/v1/responses", {"instructions": "I", "input": [{"role": "user", "content": "Hello"}]}
    )
    assert as_string == as_messages


def test_responses_input_messages_extend_like_a_conversation() -> None:
    """A longer input list extends a shorter one's prompt text."""
    earlier = prompt_of("/v1/responses", {"instructions": "I", "input": [FIRST]})
    later = prompt_of("/v1/responses", {"instructions": "I", "input": [FIRST, ANSWER, SECOND]})
    assert later.startswith(earlier)
    assert SECOND["content"] in later


# -- /v1/messages ---------------------------------------------------------------------------------


def test_messages_prompt_is_system_then_messages() -> None:
    """The Anthropic ``system`` field leads the messages."""
    prompt = prompt_of(
        "/v1/messages", {"model": "m", "system": "Be terse.", "messages": [FIRST, ANSWER]}
    )
    assert 0 <= prompt.index("Be terse.") < prompt.index(FIRST["content"])
    assert prompt.index(FIRST["content"]) < prompt.index(ANSWER["content"])


def test_messages_system_blocks_read_like_a_system_string() -> None:
    """``system`` as a list of text blocks is the same prompt as the string."""
    as_string = prompt_of("/v1/messages", {"system": "Be terse.", "messages": [FIRST]})
    as_blocks = prompt_of(
        "/v1/messages",
        {"system": [{"type": "text", "text": "Be terse."}], "messages": [FIRST]},
    )
    assert as_string == as_blocks


def test_messages_conversation_extends_the_earlier_prompt() -> None:
    """The next turn of an Anthropic conversation extends the previous prompt text."""
    earlier = prompt_of("/v1/messages", {"system": "S", "messages": [FIRST]})
    later = prompt_of("/v1/messages", {"system": "S", "messages": [FIRST, ANSWER, SECOND]})
    assert later.startswith(earlier)
    assert len(later) > len(earlier)
