"""serving/tool_parsers: worked examples per format, and the streaming contract under hypothesis.

The hypothesis tests build outputs from pieces whose meaning is known by construction (content,
a valid call with random arguments written by "the model" in a random JSON style, a malformed
block), so the expected content and calls are an independent reference; then they check that
``extract`` gives exactly that and that every random split of the text, fed in order, streams
the same content and calls (each name once, in the first delta of its index).
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.tool_parsers import (PARSERS, CallDelta, Extracted, ToolCall, ToolDelta, ToolParser,
                                  get_parser)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def call(name: str, args: dict) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def stream(cls: type[ToolParser], chunks: list[str]) -> Extracted:
    """Feed ``chunks`` in order then finish; check the delta rules; fold into an Extracted."""
    p = cls(TOOLS)
    deltas = [p.feed(c) for c in chunks] + [p.finish()]
    content = ""
    names: list[str] = []
    args: list[str] = []
    for d in deltas:
        assert isinstance(d, ToolDelta)
        content += d.content
        for c in d.calls:
            assert isinstance(c, CallDelta)
            if c.index == len(names):  # a new index: its first delta carries the name
                assert c.name, c
                names.append(c.name)
                args.append("")
            else:  # a later delta of an index already open
                assert c.index == len(names) - 1 and c.name is None, c
            args[c.index] += c.arguments
    return Extracted(content or None, [ToolCall(n, a) for n, a in zip(names, args)])


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


def check(cls: type[ToolParser], text: str, content: str | None, calls: list[ToolCall]):
    """extract and three streamings (whole, one char at a time, two halves) all give the same."""
    want = Extracted(content, calls)
    assert cls(TOOLS).extract(text) == want
    assert stream(cls, [text]) == want
    assert stream(cls, list(text)) == want
    assert stream(cls, [text[: len(text) // 2], text[len(text) // 2:]]) == want


# -- registry --------------------------------------------------------------------------------
def test_get_parser_names_and_error():
    assert get_parser("hermes") is PARSERS["hermes"]
    assert all(PARSERS[n].name == n for n in PARSERS)
    with pytest.raises(ValueError, match=r"^tool_call_parser='nope' is invalid: must be one of "
                                         r"hermes"):
        get_parser("nope")


def test_feed_after_finish_is_an_error():
    p = get_parser("hermes")(None)
    p.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        p.feed("x")


# -- hermes ----------------------------------------------------------------------------------
H = get_parser("hermes")


def tc(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def test_hermes_worked_examples():
    w = {"city": "Paris", "days": 3}
    check(H, "Just text, no calls < > <tool_", "Just text, no calls < > <tool_", [])
    check(H, tc('{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'),
          None, [call("get_weather", w)])
    # several, with content before, between and after (whitespace between calls is content too)
    text = ("Let me check.\n" + tc('{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}')
            + "\nand\n" + tc('{"arguments": {}, "name": "get_time"}') + "\nDone.")
    check(H, text, "Let me check.\n\nand\n\nDone.", [call("get_weather", w), call("get_time", {})])
    # only whitespace outside the calls: no content
    check(H, "\n" + tc('{"name": "a", "arguments": {}}') + "\n" + tc('{"name": "b"}') + "\n",
          None, [call("a", {}), call("b", {})])
    # unicode, escaped quotes and backslashes, nested objects; \u escapes come out as characters
    args = {"q": 'say "hi" \\ there', "city": "Zürich 東京 😀", "nested": {"a": [1, {"b": None}],
                                                                         "t": True}, "x": 1.5}
    check(H, tc(json.dumps({"name": "search", "arguments": args})), None, [call("search", args)])
    check(H, tc(json.dumps({"name": "search", "arguments": args}, ensure_ascii=False)), None,
          [call("search", args)])
    # "parameters" instead of "arguments", and arguments given as a JSON string
    check(H, tc('{"name": "f", "parameters": {"a": 1}}'), None, [call("f", {"a": 1})])
    check(H, tc('{"name": "f", "arguments": "{\\"a\\": 1}"}'), None, [call("f", {"a": 1})])
    # a name that is not in `tools` stays a call (vLLM does not check names either)
    check(H, tc('{"name": "not_a_tool", "arguments": {}}'), None, [call("not_a_tool", {})])
    # a final block without its closing tag is still a call when its JSON is whole
    check(H, "Sure. <tool_call>\n" + '{"name": "f", "arguments": {"a": "</tool"}}\n', "Sure. ",
          [call("f", {"a": "</tool"})])


def test_hermes_malformed_calls_are_content():
    bad = [tc('{"name": "f", "arguments": {"a": 1}'),  # bad JSON
           tc('{"arguments": {"a": 1}}'),  # no name
           tc('{"name": 3, "arguments": {}}'),  # name not a string
           tc('{"name": "f", "arguments": [1, 2]}'),  # arguments not an object
           tc('["f", {}]'),  # not an object
           "<tool_call></tool_call>"]
    for b in bad:
        check(H, b, b, [])
    good = tc('{"name": "g", "arguments": {"k": "v"}}')
    check(H, "A " + bad[0] + " B " + good + " C", "A " + bad[0] + " B  C", [call("g", {"k": "v"})])
    # an unclosed block that does not parse: the whole rest is content, opening tag included
    check(H, 'x <tool_call>{"name": "f", "argum', 'x <tool_call>{"name": "f", "argum', [])
    # the tag itself is held back while it could still be one, then released as content
    p = H(None)
    assert p.feed("Hi <tool").content == "Hi "
    assert p.feed("_ca").content == ""
    assert p.feed("ll!").content == "<tool_call!"
    assert p.finish() == ToolDelta()


# -- hypothesis: the contract ----------------------------------------------------------------
JSON_LEAF = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=4)
NAMES = st.sampled_from(["get_weather", "f", "search_web", "tool-2", "unknown_fn"])
# content pieces: no ">" anywhere, so they can begin but never complete a hermes tag
CONTENT_ATOMS = st.sampled_from(["Hi", " ", "\n", "<", "<tool_", "<tool_call", "</tool_call",
                                 "é😀", "東京", '{"a": 1}', "[", "]", ";", '"', "\\", "x,y"])
CONTENT = st.lists(CONTENT_ATOMS, max_size=4).map("".join)
CUTS = st.lists(st.integers(0, 10**6), max_size=12)


@st.composite
def model_json(draw, obj) -> str:
    """``obj`` as a model might write it: ASCII escapes or not, compact or spaced or indented."""
    style = draw(st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1}]))
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), **style)


@st.composite
def hermes_output(draw):
    text, content, calls = "", "", []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "call", "bad"]))
        if kind == "content":
            piece = draw(CONTENT)
            text, content = text + piece, content + piece
        elif kind == "call":
            name, args = draw(NAMES), draw(ARGS)
            key = draw(st.sampled_from(["arguments", "parameters"]))
            text += tc(draw(model_json({"name": name, key: args})))
            calls.append(call(name, args))
        else:
            piece = "<tool_call>" + draw(CONTENT) + "</tool_call>"
            text, content = text + piece, content + piece
    if draw(st.booleans()):  # a final call whose closing tag never came
        name, args = draw(NAMES), draw(ARGS)
        text += "<tool_call>" + draw(model_json({"name": name, "arguments": args}))
        calls.append(call(name, args))
    return text, (content if content.strip() else None), calls


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(hermes_output(), CUTS)
def test_hermes_contract(out, cuts):
    text, content, calls = out
    want = Extracted(content, calls)
    assert H(TOOLS).extract(text) == want
    assert stream(H, split(text, cuts)) == want


# -- llama3_json -----------------------------------------------------------------------------
L = get_parser("llama3_json")


def test_llama3_json_worked_examples():
    w = {"city": "Paris", "days": 3}
    one = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
    check(L, one, None, [call("get_weather", w)])
    check(L, "<|python_tag|>" + one, None, [call("get_weather", w)])
    check(L, "\n <|python_tag|> " + one + " ;\n" + '{"name": "f", "arguments": {}};', None,
          [call("get_weather", w), call("f", {})])
    # prose first: all content, even when JSON follows (a call must open the output)
    check(L, "The answer is " + one, "The answer is " + one, [])
    check(L, "<|python_tag|>print(1)", "<|python_tag|>print(1)", [])  # a code call, not JSON
    check(L, "<|python", "<|python", [])
    # unicode, escaped quotes, nested objects
    args = {"q": 'a "quoted" \\ back}slash{', "where": "Zürich 東京", "n": {"m": [1, {"k": None}]}}
    check(L, json.dumps({"name": "s", "parameters": args}), None, [call("s", args)])
    # text after a call: from the end of the last good call on, it is content
    check(L, one + " Hope that helps!", " Hope that helps!", [call("get_weather", w)])
    check(L, one + '; {"name": 1}', '; {"name": 1}', [call("get_weather", w)])


def test_llama3_json_malformed_is_content():
    for bad in ['{"name": "f", "parameters": {"a": 1}', '{"parameters": {}}', "{'name': 'f'}",
                '<|python_tag|>{"name": "f", "parameters": [1]}', "{", "{}"]:
        check(L, bad, bad, [])
    p = L(None)
    assert p.feed("  <|pyth").content == ""
    assert p.feed("on_tag|>{").content == ""
    assert p.feed('"name": "f"} x').calls == [CallDelta(0, "f", "{}")]
    assert p.finish() == ToolDelta()


@st.composite
def llama3_output(draw):
    lead = draw(st.sampled_from(["", " ", "\n"]))
    if draw(st.booleans()):  # no call: prose (which may even start with "{" or the tag)
        text = lead + draw(st.sampled_from(["", "<|python_tag|>"])) + draw(CONTENT)
        return text, (text if text.strip() else None), []
    text = lead + draw(st.sampled_from(["", "<|python_tag|>"]))
    calls = []
    for i in range(draw(st.integers(1, 3))):
        if i:
            text += draw(st.sampled_from([";", "; ", " ;\n"]))
        name, args = draw(NAMES), draw(ARGS)
        text += draw(model_json({"name": name, draw(st.sampled_from(["parameters", "arguments"])): args}))
        calls.append(call(name, args))
    tail = draw(st.sampled_from(["", ";", " ;\n", " "])) + draw(CONTENT)
    # content is all text outside the calls: the leading whitespace too, once it is not alone
    return text + tail, (None if re.fullmatch(r"\s*(;\s*)?", tail) else lead + tail), calls


@SETTINGS
@given(llama3_output(), CUTS)
def test_llama3_json_contract(out, cuts):
    text, content, calls = out
    want = Extracted(content, calls)
    assert L(TOOLS).extract(text) == want
    assert stream(L, split(text, cuts)) == want


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
    text, content, calls = out
    want = Extracted(content, calls)
    assert M(TOOLS).extract(text) == want
    assert stream(M, split(text, cuts)) == want
