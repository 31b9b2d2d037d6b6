"""The JSON-object tool parsers (hermes, llama3_json): worked examples, malformed calls, the
streaming contract under hypothesis, and their streamed arguments (serving/tool_parsers/stream_args.py).
Method: see tests/serving/test_tool_parsers.py.
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import CallDelta, ToolCall, ToolDelta, get_parser
from tool_parse_helpers import (ARGS, CONTENT, CUTS, DRAWN_NAMES, JSON_VALUE, NAMES, SETTINGS, TOOLS, call, check,
                                contract, model_json, split, stream)


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
    # a lone surrogate escape is valid JSON but cannot be UTF-8: it stays escaped, the rest not
    check(H, tc('{"name": "f", "arguments": {"s": "\\ud800 \\u00e9"}}'), None,
          [ToolCall("f", '{"s": "\\ud800 é"}')])
    check(H, tc('{"arguments": {"s": "\\ud800 \\u00e9"}, "name": "f"}'), None,  # judged whole: all escaped
          [ToolCall("f", '{"s": "\\ud800 \\u00e9"}')])
    # a name that is not in `tools` stays a call (vLLM does not check names either)
    check(H, tc('{"name": "not_a_tool", "arguments": {}}'), None, [call("not_a_tool", {})])
    # a final block without its closing tag is still a call when its JSON is whole
    check(H, "Sure. <tool_call>\n" + '{"name": "f", "arguments": {"a": "</tool"}}\n', "Sure. ",
          [call("f", {"a": "</tool"})])


def test_hermes_malformed_calls_are_content():
    bad = [tc('{"arguments": {"a": 1}, "name": "f"'),  # bad JSON
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
    check(H, 'x <tool_call>{"name": "", "arguments": {}}', 'x <tool_call>{"name": "", "arguments": {}}', [])
    # the tag itself is held back while it could still be one, then released as content
    p = H(None)
    assert p.feed("Hi <tool").content == "Hi "
    assert p.feed("_ca").content == ""
    assert p.feed("ll!").content == "<tool_call!"
    assert p.finish() == ToolDelta()


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


@SETTINGS
@given(hermes_output(), CUTS)
def test_hermes_contract(out, cuts):
    contract(H, out, cuts)


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
    for bad in ['{"parameters": {"a": 1}, "name": "f"', '{"parameters": {}}', "{'name': 'f'}",
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
    contract(L, out, cuts)


# -- streamed arguments (hermes, llama3_json) ------------------------------------------------
def _fold(deltas: list[ToolDelta]) -> list[tuple[str | None, str]]:
    """(name, accumulated arguments) per call after ``deltas``."""
    calls: list[list] = []
    for d in deltas:
        for c in d.calls:
            if c.index == len(calls):
                calls.append([c.name, ""])
            calls[c.index][1] += c.arguments
    return [tuple(c) for c in calls]


@pytest.mark.parametrize("cls, lead", [(H, "Sure. <tool_call>\n"), (L, "<|python_tag|>")])
def test_arguments_stream_while_the_model_writes_them(cls, lead):
    """The name goes out once the arguments' "{" is read, then the arguments grow with the text:
    what has been released after each character is the canonical text so far (held: only an
    unfinished number, literal or escape)."""
    body = '{"name": "get_weather", "arguments": {"city": "Par\\u00eds", "days": 12, "ok": true}}'
    text = lead + body + ("\n</tool_call>" if cls is H else "")
    p = cls(TOOLS)
    deltas, seen = [], {}
    for i, ch in enumerate(text):
        deltas.append(p.feed(ch))
        seen[text[: i + 1]] = _fold(deltas)
    deltas.append(p.finish())
    at = len(lead) + body.index('"arguments": {') + len('"arguments": {')
    assert seen[text[: at - 1]] == []  # before the arguments' "{": nothing yet
    assert seen[text[:at]] == [("get_weather", "{")]
    assert seen[text[: at + len('"city": "Pa')]] == [("get_weather", '{"city": "Pa')]
    assert seen[text[: at + len('"city": "Par\\u00e')]] == [("get_weather", '{"city": "Par')]  # \u00ed not whole
    assert seen[text[: at + len('"city": "Par\\u00eds", "days": 1')]] == [
        ("get_weather", '{"city": "París", "days": ')]  # 1 may be 12: held
    assert seen[text[: at + len('"city": "Par\\u00eds", "days": 12,')]] == [
        ("get_weather", '{"city": "París", "days": 12, ')]
    assert _fold(deltas) == [("get_weather", '{"city": "París", "days": 12, "ok": true}')]
    assert 2 < sum(len(d.calls) for d in deltas)  # in pieces, not one delta


def test_hermes_call_that_breaks_after_its_name_stays_a_call():
    """vLLM's streaming: what was sent stays sent. The arguments stop at the last valid character,
    the rest of the block is dropped, and the whole answer says the same as the stream."""
    w = '{"name": "f", "arguments": {"a": 1, "b": tru, "c": 3}}'
    check(H, "A " + tc(w) + " B", "A  B", [ToolCall("f", '{"a": 1, "b": ')])
    check(H, tc('{"name": "f", "arguments": {"a": 1}'), None, [call("f", {"a": 1})])  # outer "}" missing
    check(H, tc('{"name": "f", "arguments": {"a": 1}, "id": 7}'), None, [call("f", {"a": 1})])  # more keys
    # the output stops mid-arguments (max_tokens): the call has the arguments written so far
    check(H, 'Sure. <tool_call>\n{"name": "f", "arguments": {"city": "Pa', "Sure. ", [ToolCall("f", '{"city": "Pa')])
    check(H, '<tool_call>{"name": "f", "arguments": {"n": 12', None, [ToolCall("f", '{"n": ')])
    # the block ends inside the arguments (a raw newline cannot be in a JSON string): the call ends
    # there, text after the block is content
    check(H, tc('{"name": "f", "arguments": {"s": "x') + "after", "after", [ToolCall("f", '{"s": "x')])


def test_llama3_json_call_that_breaks_after_its_name_stays_a_call():
    check(L, '{"name": "f", "parameters": {"a": 1}', None, [call("f", {"a": 1})])  # outer "}" missing
    check(L, '{"name": "f", "parameters": {"a": tru}}; {"name": "g", "parameters": {}}', None,
          [ToolCall("f", '{"a": '), call("g", {})])  # the object still closes: the next call is read
    check(L, '{"name": "f", "parameters": {"a": 1}, "x": [2]} Hope that helps', " Hope that helps",
          [call("f", {"a": 1})])
    check(L, '{"name": "f", "parameters": {"q": "unclosed} ; more', None, [ToolCall("f", '{"q": "unclosed} ; more')])


def test_arguments_are_rewritten_as_json_dumps_writes_them():
    raw = '{"a":1.0E2,"b":"\\u00e9\\n\\/\\ud83d\\ude00","c":[ ],"d":{ },"e":[1,[2,{"f":null}]],"g":-0,"h":1e-7}'
    want = json.dumps(json.loads(raw), ensure_ascii=False)
    for cls, text in ((H, tc('{"name": "f", "arguments": ' + raw + "}")),
                      (L, '{"name": "f", "parameters": ' + raw + "}")):
        check(cls, text, None, [ToolCall("f", want)])


@SETTINGS
@given(JSON_VALUE.filter(lambda v: isinstance(v, dict)) | ARGS, st.data(), CUTS)
def test_arguments_streamer_any_split_and_any_cut(args, data, cuts):
    """Any object as a model writes it, split anywhere: the canonical text; cut anywhere: a prefix
    of it (a broken or unfinished call never sends text the whole call would not have)."""
    from serving.tool_parsers.stream_args import ArgsStreamer

    raw = data.draw(model_json(args))
    want = json.dumps(args, ensure_ascii=False)
    s = ArgsStreamer()
    assert "".join(s.feed(p) for p in split(raw, cuts)) == want and s.done
    cut = data.draw(st.integers(0, len(raw)))
    s = ArgsStreamer()
    got = s.feed(raw[:cut])
    assert want.startswith(got) and (s.done or cut < len(raw))
    s = ArgsStreamer()  # a character that cannot continue the JSON: nothing from it on
    got = s.feed(raw[:cut] + "\x00" + raw[cut:])
    assert want.startswith(got) and (s.broken or s.done)


@st.composite
def broken_calls(draw, parser):
    """Outputs whose calls may break anywhere after the model began them: a call's text cut at a
    random point, then maybe a bad character, then the block's end (hermes) or more text."""
    text, wanted = "", []
    for _ in range(draw(st.integers(1, 3))):
        name, args = draw(NAMES), draw(ARGS)
        key = "arguments" if parser is H else "parameters"
        body = draw(model_json({"name": name, key: args}))
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.sampled_from(["", "\x00", "}", "]", " tru", "</tool_call>"]))
        wanted.append((name, json.dumps(args, ensure_ascii=False)))
        text += (tc(body) + draw(CONTENT) if parser is H else (body if not text else "; " + body))
    return text, wanted


@SETTINGS
@pytest.mark.parametrize("cls", [H, L])
@given(data=st.data(), cuts=CUTS)
def test_broken_calls_stream_as_they_parse(cls, data, cuts):
    """Split-invariance when calls break anywhere (what the stream sent is what the whole parse
    answers), and no call appears that the model did not begin: a parsed call's name is one of the
    calls' names, or garbled text of a break (a call cut inside its name string swallows what
    follows: '{"name": "' + '; {' + '"}' is the valid call named '; {'), never another drawn name."""
    text, wanted = data.draw(broken_calls(cls))
    whole = cls(TOOLS).extract(text)
    assert stream(cls, split(text, cuts)) == whole
    names = [n for n, _ in wanted]
    got = [c.name for c in whole.calls]
    assert len(got) <= len(names)
    assert all(n in names or n not in DRAWN_NAMES for n in got), (got, names)
