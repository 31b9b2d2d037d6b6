"""serving/tool_parsers: worked examples per format, and the streaming contract under hypothesis.

The hypothesis tests build outputs from pieces whose meaning is known by construction (content,
a valid call with random arguments written by "the model" in a random JSON style, a malformed
block), so the expected content and calls are an independent reference; then they check that
``extract`` gives exactly that and that every random split of the text, fed in order, streams
the same content and calls (each name once, in the first delta of its index).
The formats' own tests: test_tool_parsers_json.py (hermes, llama3_json), test_tool_parsers_mistral.py,
test_tool_parsers_pythonic.py, test_tool_parsers_qwen3_coder.py; here the registry and every parser on
arbitrary text.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import PARSERS, ToolDelta, get_parser
from tool_parse_helpers import CUTS, SETTINGS, split, stream


# -- registry --------------------------------------------------------------------------------
def test_get_parser_names_and_error():
    assert get_parser("hermes") is PARSERS["hermes"]
    assert {n for n in PARSERS if PARSERS[n].name == n} == {"hermes", "llama3_json", "mistral",
                                                           "pythonic", "qwen3_coder"}
    assert get_parser("llama4_json").name == "llama3_json"  # vLLM's aliases
    assert get_parser("llama4_pythonic").name == "pythonic"
    assert get_parser("qwen3_xml").name == "qwen3_coder"
    with pytest.raises(ValueError, match=r"^tool_call_parser='nope' is invalid: must be one of "
                                         r"hermes"):
        get_parser("nope")


def test_feed_after_finish_is_an_error_and_calls_are_counted():
    p = get_parser("hermes")(None)
    assert p.feed("") == ToolDelta() and p.num_calls == 0
    p.feed('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"}')
    assert p.num_calls == 1
    p.finish()
    assert p.num_calls == 2
    with pytest.raises(RuntimeError, match="after finish"):
        p.feed("x")
    with pytest.raises(RuntimeError, match="finish called twice"):
        p.finish()


# -- any text, any parser --------------------------------------------------------------------
NOISE = st.lists(st.sampled_from(
    ["<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
     "<|python_start|>", "<|python_end|>", '{"name": "f", "arguments": {}}', '{"name": "g"}', "{",
     "}", "[", "]", "(", ")", "f(", "x=1", "'", '"', '"""', "\\", ";", ",", " ", "\n", "#", "é😀",
     "get_weather", "[f()]", "null", "<function=f>", "<function=", "<parameter=x>", "</parameter>",
     "</function>", ">", "=", "<"]), max_size=14).map("".join)


@SETTINGS
@given(st.sampled_from(sorted(PARSERS)), NOISE, CUTS)
def test_any_text_splits_alike_and_loses_nothing_without_calls(name, text, cuts):
    """Arbitrary mixes of every format's markers: every split streams what extract says, and an
    output in which no call was found comes back whole as content."""
    cls = get_parser(name)
    got = cls(None).extract(text)
    assert stream(cls, split(text, cuts)) == got
    if not got.calls:
        assert got.content == (text if text.strip() else None)
