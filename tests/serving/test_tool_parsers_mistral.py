"""The mistral tool parser: worked examples, malformed groups, the streaming contract under hypothesis.
Method: see tests/serving/test_tool_parsers.py.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import ToolCall, ToolDelta, get_parser
from tool_parse_helpers import (ARGS, CONTENT, CUTS, NAMES, SETTINGS, TOOLS, call, check, contract, model_json,
                                split, stream)


# -- mistral ---------------------------------------------------------------------------------
M = get_parser("mistral")


def test_mistral_worked_examples():
    w = {"city": "Paris", "days": 3}
    arr = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "f", "arguments": {}}]'
    check(M, "[TOOL_CALLS]" + arr, None, [call("get_weather", w), call("f", {})])
    check(M, "Checking. [TOOL_CALLS] " + arr + " Done.", "Checking.  Done.",
          [call("get_weather", w), call("f", {})])
    # the name-then-object formats (v11: name{...}; v13: name[ARGS]{...}), one group per call
    check(M, '[TOOL_CALLS]get_weather{"city": "Paris", "days": 3}[TOOL_CALLS]f{}', None,
          [call("get_weather", w), call("f", {})])
    check(M, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}', None,
          [call("get_weather", w)])
    args = {"q": 'say "hi" \\ ]}', "city": "Zürich 東京 😀", "nested": {"a": [1, {"b": None}]}}
    check(M, "[TOOL_CALLS]" + json.dumps([{"name": "s", "arguments": args}]), None, [call("s", args)])
    check(M, "[TOOL_CALLS]s" + json.dumps(args, ensure_ascii=False), None, [call("s", args)])
    check(M, "[TOOL_CALLS][" + json.dumps({"name": "s", "arguments": json.dumps(args)}) + "]", None,
          [call("s", args)])  # arguments given as a JSON string
    check(M, "No calls, [TOOL] [ARGS] [TOOL_CALL", "No calls, [TOOL] [ARGS] [TOOL_CALL", [])


def test_mistral_malformed_groups_are_content():
    for bad in ['[TOOL_CALLS][{"name": "f", "arguments": {}}', '[TOOL_CALLS][{"arguments": {}}]',
                "[TOOL_CALLS][]", '[TOOL_CALLS][{"name": "f", "arguments": 3}]', "[TOOL_CALLS]",
                "[TOOL_CALLS]f", "[TOOL_CALLS]f[ARG", '[TOOL_CALLS]f[ARGS] {"a": 1}',
                "[TOOL_CALLS]f{1: 2}", "[TOOL_CALLS]f{ 1", "[TOOL_CALLS]f[ARGS]{\n", "[TOOL_CALLS]!"]:
        check(M, bad, bad, [])
    # reading goes on after a bad group
    check(M, '[TOOL_CALLS]f (x) [TOOL_CALLS]g{"k": 1} end', "[TOOL_CALLS]f (x)  end",
          [call("g", {"k": 1})])
    check(M, "[TOOL_CALLS]" + "n" * 129 + "{}", "[TOOL_CALLS]" + "n" * 129 + "{}", [])  # name cap


MISTRAL_ATOMS = st.sampled_from(["Hi", " ", "\n", "[", "[TOOL_", "[TOOL_CALLS", "[ARGS", "é😀",
                                 '{"a": 1}', "{", "}", ";", '"', "\\"])  # no "]": no marker
MISTRAL_BAD = st.sampled_from(['[{"name": 1}]', "[1, 2]", "[]", '{"a": 1}', "!", " ?", "f!",
                               "f[AR!", '[{"name": "f", "arguments": []}]'])


@st.composite
def mistral_output(draw):
    text, content, calls = "", "", []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "array", "named", "bad"]))
        if kind == "content":
            piece = draw(st.lists(MISTRAL_ATOMS, max_size=4).map("".join))
            content += piece
        elif kind == "bad":
            piece = "[TOOL_CALLS]" + draw(MISTRAL_BAD)
            content += piece
        elif kind == "array":
            group = [(draw(NAMES), draw(ARGS)) for _ in range(draw(st.integers(1, 3)))]
            piece = "[TOOL_CALLS]" + draw(st.sampled_from(["", " "])) + draw(
                model_json([{"name": n, "arguments": a} for n, a in group]))
            calls += [call(n, a) for n, a in group]
        else:
            name, args = draw(NAMES), draw(ARGS)
            piece = ("[TOOL_CALLS]" + name + draw(st.sampled_from(["", "[ARGS]"]))
                     + draw(model_json(args)))
            calls.append(call(name, args))
        text += piece
    if draw(st.booleans()):  # cut off inside a group: that group is content
        piece = draw(st.sampled_from(['[TOOL_CALLS][{"name": "f"', "[TOOL_CALLS]get_weather",
                                      "[TOOL_CALLS]f[ARGS]", "[TOOL_CALLS]f{ ", "[TOOL_CALLS"]))
        text, content = text + piece, content + piece
    elif draw(st.booleans()):  # cut off inside streamed arguments: the call stands as far as it got
        text += '[TOOL_CALLS]f{"a": "}'
        calls.append(ToolCall("f", '{"a": "}'))
    return text, (content if content.strip() else None), calls


@SETTINGS
@given(mistral_output(), CUTS)
def test_mistral_contract(out, cuts):
    contract(M, out, cuts)


# -- streamed arguments (the name-then-object formats) ---------------------------------------
def _fold(deltas: list[ToolDelta]) -> list[tuple[str | None, str]]:
    calls: list[list] = []
    for d in deltas:
        for c in d.calls:
            if c.index == len(calls):
                calls.append([c.name, ""])
            calls[c.index][1] += c.arguments
    return [tuple(c) for c in calls]


@pytest.mark.parametrize("mark", ["", "[ARGS]"])
def test_mistral_arguments_stream_while_the_model_writes_them(mark):
    """The name goes out once the object's first key (or its end) shows, then the arguments grow
    with the text: what has been released after each character is the canonical text so far."""
    lead = "Checking. [TOOL_CALLS]get_weather" + mark
    body = '{ "city":"Par\\u00eds","days":12}'
    text = lead + body + " Done."
    p = M(TOOLS)
    deltas, seen, content = [], {}, ""
    for i, ch in enumerate(text):
        deltas.append(p.feed(ch))
        content += deltas[-1].content
        seen[text[: i + 1]] = _fold(deltas)
    deltas.append(p.finish())
    content += deltas[-1].content
    at = len(lead) + 2  # "{ " read: not yet known to be an object of keys
    assert seen[text[:at]] == []
    assert seen[text[: at + 1]] == [("get_weather", "{\"")]  # the key's quote: streamed from here
    assert seen[text[: at + len('"city":"Pa')]] == [("get_weather", '{"city": "Pa')]
    assert seen[text[: at + len('"city":"Par\\u00eds","days":1')]] == [("get_weather", '{"city": "París", "days": ')]
    assert _fold(deltas) == [("get_weather", '{"city": "París", "days": 12}')]
    assert content == "Checking.  Done."
    assert 2 < sum(len(d.calls) for d in deltas)  # in pieces, not one delta


def test_mistral_call_that_breaks_after_its_name_stays_a_call():
    """As hermes and llama3_json: what was sent stays sent; the arguments stop at the last valid
    character, the object's text up to where its brackets close is dropped, reading goes on."""
    check(M, '[TOOL_CALLS]f{"a": 1, "b": tru, "c": 3} after', " after", [ToolCall("f", '{"a": 1, "b": ')])
    check(M, '[TOOL_CALLS]f{"a": 1}}[TOOL_CALLS]g{}', "}", [call("f", {"a": 1}), call("g", {})])
    check(M, '[TOOL_CALLS]f[ARGS]{"a": 12', None, [ToolCall("f", '{"a": ')])  # cut inside a number
    check(M, '[TOOL_CALLS]f{"q": "unclosed} [TOOL_CALLS]g{}', None,
          [ToolCall("f", '{"q": "unclosed} [TOOL_CALLS]g{}')])  # the string never ends: nor does the call
    check(M, "[TOOL_CALLS]f{}", None, [call("f", {})])


@st.composite
def broken_named_calls(draw):
    """Named-format groups cut anywhere in their object, then maybe a bad character, then content."""
    text, names = "", []
    for _ in range(draw(st.integers(1, 3))):
        name, args = draw(NAMES), draw(ARGS)
        body = draw(model_json(args))
        body = body[: draw(st.integers(0, len(body)))] + draw(st.sampled_from(["", "\x00", "}", "]", " tru"]))
        text += "[TOOL_CALLS]" + name + draw(st.sampled_from(["", "[ARGS]"])) + body + draw(CONTENT)
        names.append(name)
    return text, names


@SETTINGS
@given(broken_named_calls(), CUTS)
def test_mistral_broken_calls_stream_as_they_parse(out, cuts):
    """Split-invariance when named calls break anywhere, and every call is one the model began, in order."""
    text, names = out
    whole = M(TOOLS).extract(text)
    assert stream(M, split(text, cuts)) == whole
    got = [c.name for c in whole.calls]
    assert len(got) <= len(names) and all(n in names for n in got)
