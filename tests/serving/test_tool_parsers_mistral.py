"""The mistral tool parser: worked examples, malformed groups, the streaming contract under hypothesis.
Method: see tests/serving/test_tool_parsers.py.
"""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import get_parser
from tool_parse_helpers import ARGS, CUTS, NAMES, SETTINGS, call, check, contract, model_json


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
                "[TOOL_CALLS]f{1: 2}", "[TOOL_CALLS]f{\"a\": 1", "[TOOL_CALLS]!"]:
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
                                      "[TOOL_CALLS]f[ARGS]", '[TOOL_CALLS]f{"a": "}', "[TOOL_CALLS"]))
        text, content = text + piece, content + piece
    return text, (content if content.strip() else None), calls


@SETTINGS
@given(mistral_output(), CUTS)
def test_mistral_contract(out, cuts):
    contract(M, out, cuts)
