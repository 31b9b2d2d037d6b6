"""The qwen3_coder tool parser: worked examples (schema conversions, malformed and cut-off calls)
and the streaming contract under hypothesis. Method: see tests/serving/test_tool_parsers.py.
"""
from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import CallDelta, ToolCall, ToolDelta, get_parser
from tool_parse_helpers import (CONTENT_ATOMS, CUTS, JSON_VALUE, SETTINGS, call, check, contract, split,
                                stream)

Q = get_parser("qwen3_coder")
ALL = {"s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
       "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": "array"},
       "z": {"type": "null"}, "ns": {"type": ["string", "null"]},
       "any": {"anyOf": [{"type": "null"}, {"type": "integer"}]}, "u": {"description": "no type"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "types", "parameters": {"type": "object", "properties": ALL}}}]


def fn(name: str, *params: tuple[str, str], block: bool = True) -> str:
    """A call as Qwen3-Coder's chat template writes it (each value on its own lines)."""
    body = f"<function={name}>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params) + "</function>"
    return f"<tool_call>\n{body}\n</tool_call>" if block else body


def q(text, content, calls):
    check(Q, text, content, calls, TOOLS)


def test_qwen3_coder_one_call_and_two_with_content_around():
    w = {"city": "Paris", "days": 3}
    q(fn("get_weather", ("city", "Paris"), ("days", "3")), None, [call("get_weather", w)])
    text = ("Let me check.\n" + fn("get_weather", ("city", "Paris"), ("days", "3")) + "\nand\n"
            + fn("get_weather", ("city", "Rome"), ("days", "1")) + "\nDone.")
    q(text, "Let me check.\n\nand\n\nDone.", [call("get_weather", w), call("get_weather", {"city": "Rome", "days": 1})])
    # only whitespace outside the calls: no content; tags on one line; two functions in one block
    q("\n<tool_call><function=get_weather><parameter=days>2</parameter></function></tool_call>\n", None,
      [call("get_weather", {"days": 2})])
    q("<tool_call>\n" + fn("a", block=False) + "\n" + fn("b", ("x", "1"), block=False) + "\n</tool_call>", None,
      [call("a", {}), call("b", {"x": 1})])
    # no <tool_call> around the function (vLLM's fallback); the text after it is content
    q("Sure: " + fn("get_weather", ("city", "Oslo"), block=False) + " ok", "Sure:  ok",
      [call("get_weather", {"city": "Oslo"})])
    # spaces around a name are not part of it
    q("<function= get_weather ><parameter= days >1</parameter></function>", None, [call("get_weather", {"days": 1})])


def test_qwen3_coder_converts_each_value_by_its_schema_type():
    cases = [  # (parameter, raw text, JSON value)
        ("s", "3", "3"), ("s", "null", "null"), ("s", " spaced ", " spaced "), ("s", "", ""),
        ("i", "42", 42), ("i", "-7", -7), ("i", "4.5", "4.5"), ("i", "many", "many"), ("i", "null", None),
        ("n", "2.5", 2.5), ("n", "3.0", 3), ("n", "1e3", 1000), ("n", "12345678901234567890", 12345678901234567890),
        ("n", "nan", "nan"), ("n", "-inf", "-inf"), ("n", "x1", "x1"),
        ("b", "true", True), ("b", "False", False), ("b", "TRUE", True), ("b", "yes", "yes"),
        ("o", '{"k": [1, null]}', {"k": [1, None]}), ("o", "{'k': (1, None, True)}", {"k": [1, None, True]}),
        ("o", "{not json", "{not json"), ("o", "NaN", "NaN"), ("o", "{1, 2}", "{1, 2}"),
        ("a", "[1, 'two', 3.5]", [1, "two", 3.5]), ("a", '["\\ud83d\\ude00"]', ["😀"]),
        ("z", "null", None), ("z", "NULL", None), ("ns", "null", None), ("ns", "text", "text"),
        ("i", "None", None), ("ns", "None", None), ("s", "None", "None"), ("b", "None", None),
        ("any", "5", 5), ("any", "null", None), ("any", "five", "five"),
        ("u", "[1]", [1]), ("u", "plain", "plain"), ("u", '"quoted"', "quoted"),
        ("extra", "7", 7), ("extra", "true", True), ("extra", "hello world", "hello world"),
    ]
    for p, raw, want in cases:
        q(fn("types", (p, raw)), None, [call("types", {p: want})])
    # several at once: the members come in the model's order, not the schema's
    some = [cases[i] for i in (17, 0, 20, 9, 4)]
    assert [p for p, _, _ in some] == ["b", "s", "o", "n", "i"]
    q(fn("types", *[(p, raw) for p, raw, _ in some]), None, [call("types", {p: want for p, _, want in some})])
    # an unknown function: no schema, every value read as JSON else text
    q(fn("not_a_tool", ("n", "3"), ("s", "Paris"), ("o", '{"a": 1}'), ("p", "{'a': 1}")), None,
      [call("not_a_tool", {"n": 3, "s": "Paris", "o": {"a": 1}, "p": "{'a': 1}"})])
    # a lone surrogate is valid JSON but cannot be UTF-8: that value is written escaped
    q(fn("types", ("a", '["\\ud800"]'), ("s", "é")), None, [ToolCall("types", '{"a": ["\\ud800"], "s": "é"}')])


def test_qwen3_coder_raw_values_keep_newlines_and_angle_brackets():
    code = "def f(a, b):\n    if a < b and b > 0:\n        return '<div>' + \"</p>\"\n\n"
    q(fn("get_weather", ("city", code)), None, [call("get_weather", {"city": code})])
    q(fn("get_weather", ("city", "\nx\n")), None, [call("get_weather", {"city": "\nx\n"})])  # one newline trimmed
    # a tag in a value closes it only when what follows says so (current vLLM's look-ahead)
    q("<function=get_weather><parameter=city>a</function>b</parameter></function>", None,
      [call("get_weather", {"city": "a</function>b"})])
    q("<function=f><parameter=x>1<parameter=y>2</function>", None, [call("f", {"x": "1<parameter=y>2"})])
    q("<function=f><parameter=x>1\n<parameter=x>2</function>", None, [ToolCall("f", '{"x": 1, "x": 2}')])


def test_qwen3_coder_looks_ahead_to_tell_a_closing_tag_from_text_in_a_value():
    """The cases vLLM's qwen3coder parser describes: a file written as one value that contains the
    tags (its ``_find_true_param_end`` / ``_find_true_function_end`` / ``_get_function_calls``)."""
    def wf(*params, tail="\n</tool_call>"):  # write_file as the template writes it
        return "<tool_call>\n<function=types>\n" + "".join(
            f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params) + "</function>" + tail
    cases = [  # a string value holding a tag the look-ahead reads as text
        'x = "</parameter>"\nprint(x)', "</parameter> and more", "a</parameter>b\n</parameter>c",
        "end: </parameter>\nnext line", 'html = "</function>"', "</function> not the end",
        "</tool_call> inline", 'see "<parameter=x>" here', "no tag at all",
        "</function>\n</parameter>\n", "</parameter>\n</parameter>", "</parameter>\n\t x",
    ]
    for v in cases:
        q(wf(("s", v), ("i", "7")), None, [call("types", {"s": v, "i": 7})])
        q("Writing:\n" + wf(("s", v)) + "\nDone.", "Writing:\n\nDone.", [call("types", {"s": v})])
    # the structural ones: </parameter> then <parameter=, </function>, </tool_call> or the end
    q("<function=f><parameter=a>1</parameter>  \n <parameter=b>2</parameter></function>", None,
      [call("f", {"a": 1, "b": 2})])
    q("<tool_call><function=f><parameter=a>x</parameter>\n</tool_call>", None, [call("f", {"a": "x"})])
    q("<function=f><parameter=a>x</parameter>\n ", None, [call("f", {"a": "x"})])
    # a missing </parameter>: </function> before </tool_call> or the end, a line-start <parameter=
    q("<tool_call>\n<function=f>\n<parameter=a>\nx\n</function>\n</tool_call>\nok", "\nok",
      [call("f", {"a": "x"})])
    q("<function=f>\n<parameter=a>\nx\n</function>", None, [call("f", {"a": "x"})])
    q("<function=f>\n<parameter=a>\nx\n<parameter=b>\n2\n</parameter>\n</function>", None,
      [call("f", {"a": "x", "b": 2})])
    # </tool_call> in a value: the end when <tool_call> or the end follows, else text
    q("<tool_call><function=f><parameter=a>x</tool_call>\n<tool_call><function=g></function></tool_call>", None,
      [call("f", {"a": "x"}), call("g", {})])
    q("<tool_call><function=f><parameter=a>x</tool_call> y", None, [call("f", {"a": "x</tool_call> y"})])
    # the output stopped in the look-ahead: what came is all there is
    q("<function=f><parameter=a>x</parameter>\n</func", None, [call("f", {"a": "x</parameter>\n</func"})])
    q("<function=f><parameter=a>x</function>\n", None, [call("f", {"a": "x"})])
    # streamed: the tag and the whitespace after it wait for the next non-space text
    p = Q(TOOLS)
    assert p.feed("<function=types><parameter=s>\nab</parameter>").calls == [
        CallDelta(0, "types", '{"s": "ab')]
    assert p.feed(" \n").calls == []
    assert p.feed("x").calls == [CallDelta(0, None, "</parameter> \\nx")]
    assert p.feed("</parameter>\n<param").calls == []
    assert p.feed("eter=i>5\n</parameter>\n</function>").calls == [CallDelta(0, None, '", "i": 5}')]
    assert p.finish() == ToolDelta()


def test_qwen3_coder_streams_string_values_as_they_come():
    """A string value goes out character by character; typed otherwise, whole at its end."""
    p = Q(TOOLS)
    got = [p.feed(d).calls for d in ["<function=types>\n<parameter=s>\n", "line 1\n", "<b>\"q\"</b>\\",
                                      "\n</para", "meter>\n<parameter=i>\n4", "2\n</parameter>\n", "</function>"]]
    assert got == [[CallDelta(0, "types", '{"s": "')], [CallDelta(0, None, "line 1")],
                   [CallDelta(0, None, '\\n<b>\\"q\\"</b>\\\\')], [], [CallDelta(0, None, '"')],
                   [], [CallDelta(0, None, ', "i": 42}')]]  # </parameter> waits for what follows
    # untyped: a string once no ending can make it JSON; nullable: once it cannot be null
    for pname, pieces, first in [("u", ["tr", "ue", " story"], 2), ("u", ["\n", " ", "Hello"], 2),
                                  ("extra", ["[1", "]"], None), ("ns", ["no", "ne"], None),
                                  ("ns", ["no", "t"], 1), ("u", ["nul", "l"], None)]:
        p = Q(TOOLS)
        p.feed(f"<function=types><parameter={pname}>")
        sent = [bool(p.feed(x).calls) for x in pieces]
        assert sent == [i == first for i in range(len(pieces))], (pname, pieces, sent)
    text = fn("types", ("u", "true story"), ("ns", "not"), ("ns", "None"), ("extra", "[1]"))
    q(text, None, [ToolCall("types", '{"u": "true story", "ns": "not", "ns": null, "extra": [1]}')])
    # a long file in 4-character deltas: its text arrives before the value ends
    body = "".join(f"def f{i}(x):\n    return '</parameter>' if x < {i} else \"</function>\"\n" for i in range(60))
    text = "<tool_call>\n" + fn("types", ("s", body), block=False) + "\n</tool_call>"
    p = Q(TOOLS)
    parts = [p.feed(text[k: k + 4]) for k in range(0, len(text), 4)] + [p.finish()]
    streamed = "".join(c.arguments for d in parts for c in d.calls)
    assert streamed == json.dumps({"s": body}, ensure_ascii=False)
    cut = text.index("\n</parameter>\n</function>")  # what was sent before the closing tag came
    before = "".join(c.arguments for d in parts[: cut // 4] for c in d.calls)
    assert len(before) > len(json.dumps(body)) - 40


def test_qwen3_coder_cut_off_calls_end_with_the_output():
    head = "Hi <tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    q(head, "Hi ", [call("get_weather", {"city": "Par"})])  # cut in a value: kept, as vLLM's parse
    q(head[:-3], "Hi ", [call("get_weather", {"city": ""})])
    q(head[:-7], "Hi ", [call("get_weather", {})])  # cut in a parameter's name: dropped
    q(head + "</par", "Hi ", [call("get_weather", {"city": "Par</par"})])
    q(fn("get_weather", ("days", "2"))[:-12], None, [call("get_weather", {"days": 2})])  # no </tool_call>
    q("<tool_call>\n<function=get_weather><parameter=days>2</parameter></tool_call>x", "x",
      [call("get_weather", {"days": 2})])  # no </function>
    # before the name closed nothing was sent: all content
    q("Hi <tool_call>\n<function=get_wea", "Hi <tool_call>\n<function=get_wea", [])
    q("Hi <tool_call>\n", "Hi <tool_call>\n", [])
    # streamed: the name with "{" when <function=...> closes, a string as it comes, "}" at the end
    p = Q(TOOLS)
    assert p.feed("A <tool_call>\n<function=get_weather").content == "A "
    assert p.feed(">\n<parameter=city>\nPar").calls == [CallDelta(0, "get_weather", '{"city": "Par')]
    assert p.feed("is\n</param").calls == [CallDelta(0, None, "is")]
    assert p.feed("eter>\n<parameter=days>\n3\n</para").calls == [CallDelta(0, None, '"')]
    assert p.finish() == ToolDelta(calls=[CallDelta(0, None, ', "days": "3\\n</para"}')])


def test_qwen3_coder_malformed_openings_are_content():
    for bad in ["<tool_call>\n<function=>\n</function>\n</tool_call>",  # empty name
                "<tool_call>\n<function=get weather \n>x</function></tool_call>",  # newline in the name
                "<tool_call><function=f<parameter=x>1</parameter></function></tool_call>",  # "<" in the name
                "<tool_call>\nno function here\n</tool_call>", "<tool_call></tool_call>", "<function=",
                "a < b > c <function", "</tool_call></function></parameter>"]:
        q(bad, bad, [])
    # a broken parameter name drops that parameter; the call stands
    q("<function=f><parameter=a b\n>1</parameter><parameter=c>2</parameter></function>", None, [call("f", {"c": 2})])
    q("x <tool_call>oops<function=f></function></tool_call>", "x ", [call("f", {})])  # junk in a block: dropped
    p = Q(None)
    assert p.feed("Hi <func").content == "Hi "
    assert p.feed("tion").content == ""
    assert p.feed("al").content == "<functional"
    assert p.finish() == ToolDelta()


# -- the contract under hypothesis -------------------------------------------------------------
SAFE = st.sampled_from(["a", " ", "\n", "<", ">", "</", "<p>", "x < y", "é😀", "</parameter", "<parameter",
                        "{", "}", '"', "\\", "null", "</function"]).map(str)
TAGS = ("</parameter>", "<parameter=", "</function>", "</tool_call>")
RAW = st.lists(SAFE, max_size=6).map("".join).filter(lambda s: not any(t in s for t in TAGS))
# content pieces: never a whole <tool_call> or <function= (no ">" or "=" in the atoms)
Q_CONTENT = st.lists(CONTENT_ATOMS | st.sampled_from(["<function", "</function", "<parameter"]),
                     max_size=4).map("".join)
PNAMES = st.sampled_from(["city", "days", "s", "i", "n", "b", "o", "a", "u", "extra", "x-y"])
# a file written as one value: long, with the tags in it where the look-ahead reads them as text
TAGGY = st.sampled_from(["</parameter>", "</function>", "</tool_call>", "<parameter=", "<tool_call>", "\n", " ",
                         "\t", "code", "x = '", "';", "é😀", '"', "\\", "<", ">", "</", "<parameter=p>"])
FILE = st.lists(TAGGY | st.text(max_size=8), min_size=20, max_size=80).map("".join)


def literal(raw: str) -> bool:
    """Reference (regexes on the whole written value, independent of the parser): no tag in ``raw``
    is structural when ``\n</parameter>`` follows it, i.e. vLLM's look-ahead reads them all as text."""
    after = raw + "\n</parameter>"
    return not (re.search(r"</parameter>\s*(<parameter=|</function>|</tool_call>)", after)
                or re.search(r"</function>\s*</tool_call>", after) or re.search(r"</tool_call>\s*<tool_call>", after)
                or "\n<parameter=" in "\n" + raw)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@st.composite
def value(draw, tool: str, pname: str):
    """(raw text as the model writes it, the JSON value it means) for a parameter of ``tool``."""
    kind = ALL.get(pname, {}).get("type") if tool == "types" else \
        {"city": "string", "days": "integer"}.get(pname) if tool == "get_weather" else None
    if kind == "string":
        s = draw(RAW | FILE.filter(literal))
        return s, s
    if kind == "integer":
        i = draw(st.integers(-10**12, 10**12))
        return str(i), i
    if kind == "number":
        f = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6))
        return repr(f), int(f) if float(f).is_integer() else f
    if kind == "boolean":
        b = draw(st.booleans())
        return draw(st.sampled_from([str(b), str(b).lower(), str(b).upper()])), b
    if kind is None and draw(st.integers(0, 4)) == 0:  # untyped text that is no JSON
        s = draw(FILE.filter(literal).filter(lambda t: not _is_json(t)))
        return s, s
    v = draw(JSON_VALUE)
    if kind in ("object", "array") and draw(st.booleans()):  # a Python literal
        v = draw(st.dictionaries(st.text(max_size=4), JSON_VALUE, max_size=3)) if kind == "object" else \
            draw(st.lists(JSON_VALUE, max_size=3))
        return repr(v), v
    return json.dumps(v, ensure_ascii=draw(st.booleans())), v


@st.composite
def qwen3_call(draw):
    """(text, ToolCall) for one well-formed call, written with or without the template's newlines."""
    name = draw(st.sampled_from(["get_weather", "types", "f", "tool-2"]))
    nl = draw(st.sampled_from(["\n", "", "\n\n"]))
    args, body = {}, f"<function={name}>{nl}"
    for p in draw(st.lists(PNAMES, unique=True, max_size=4)):
        raw, v = draw(value(name, p))
        args[p] = v
        body += f"<parameter={p}>\n{raw}\n</parameter>{nl}"
    return body + "</function>", call(name, args)


@st.composite
def qwen3_output(draw, ends: list | None = None):
    """(text, content, calls); ``ends`` collects where each call's ``</function>`` ends."""
    text, content, calls = "", "", []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "call", "calls", "bare", "bad"]))
        if kind == "content":
            piece = draw(Q_CONTENT)
            text, content = text + piece, content + piece
        elif kind in ("call", "calls"):
            written = [draw(qwen3_call()) for _ in range(1 if kind == "call" else 2)]
            text += "<tool_call>\n"
            for k, (t, c) in enumerate(written):
                text += ("\n" if k else "") + t
                calls.append(c)
                if ends is not None:
                    ends.append(len(text))
            text += "\n</tool_call>"
        elif kind == "bare":
            t, c = draw(qwen3_call())
            text += t
            calls.append(c)
            if ends is not None:
                ends.append(len(text))
        else:  # a block without a function, or a function whose name breaks: content
            piece = draw(st.sampled_from(["<tool_call>", "<tool_call>\n<function=a b\n", "<function=<"]))
            end = "</tool_call>" if piece == "<tool_call>" else draw(st.sampled_from(["", "</tool_call>"]))
            piece += draw(Q_CONTENT) + end
            text, content = text + piece, content + piece
    return text, (content if content.strip() else None), calls


@SETTINGS
@given(qwen3_output(), CUTS)
def test_qwen3_coder_contract(out, cuts):
    contract(Q, out, cuts, TOOLS)


@SETTINGS
@given(st.data(), st.integers(0, 10**6), CUTS)
def test_qwen3_coder_cut_outputs_split_alike_and_keep_the_calls_before_the_cut(data, at, cuts):
    """An output stopped anywhere (max_tokens): every split streams what extract says, and the
    calls that closed before the cut come first, unchanged."""
    ends: list[int] = []
    out = data.draw(qwen3_output(ends))
    text = out[0][: at % (len(out[0]) + 1)]
    got = Q(TOOLS).extract(text)
    assert stream(Q, split(text, cuts), TOOLS) == got
    closed = sum(e <= len(text) for e in ends)  # calls whose </function> came before the cut
    assert got.calls[:closed] == out[2][:closed]
    assert len(got.calls) in (closed, closed + 1)  # and at most the call being written
