"""The pythonic tool parser: worked examples, non-calls, the streaming contract under hypothesis.
Method: see tests/serving/test_tool_parsers.py.
"""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from serving.tool_parsers import CallDelta, ToolDelta, get_parser
from tool_parse_helpers import CONTENT, CUTS, JSON_VALUE, SETTINGS, call, check, contract


# -- pythonic --------------------------------------------------------------------------------
P = get_parser("pythonic")


def test_pythonic_worked_examples():
    w = {"city": "Paris", "days": 3}
    check(P, '[get_weather(city="Paris", days=3)]', None, [call("get_weather", w)])
    check(P, "\n[get_weather(city='Paris', days=3), get_time()]", None,
          [call("get_weather", w), call("get_time", {})])
    # Llama 4 tags; text after the list is content, the end tag and whitespace before it are not
    check(P, '<|python_start|>[f(x=1)] <|python_end|>', None, [call("f", {"x": 1})])
    check(P, '<|python_start|>[f(x=1)]<|python_end|>\nDone', "\nDone", [call("f", {"x": 1})])
    check(P, "[f(x=1)] and more", " and more", [call("f", {"x": 1})])
    # literals: signs, tuples, JSON names, nested dicts, escapes, triple quotes, unicode
    args = {"a": -1.5, "b": [1, [2, 3]], "c": {"k": None, "t": True, "u": False}, "d": "Zürich 😀",
            "e": 'say "hi" \\ )]', "f": "it's\n)", "g": +2}
    src = ("[search(a=-1.5, b=[1, (2, 3)], c={'k': null, 't': true, 'u': False}, d='Zürich 😀', "
           "e='say \"hi\" \\\\ )]', f='''it's\n)''', g=+2)]")
    check(P, src, None, [call("search", args)])
    check(P, "[s(q=" + json.dumps("東京 \"q\"") + ")]", None, [call("s", {"q": '東京 "q"'})])
    check(P, '[s(q="\\ud83d\\ude00")]', None, [call("s", {"q": "😀"})])  # a JSON-style pair
    check(P, "The answer is [f(x=1)]", "The answer is [f(x=1)]", [])  # must open the output


def test_pythonic_non_calls_are_content():
    for bad in ["[f(1)]", "[f(x=y)]", "[f(x=1), 2]", "[f(**k)]", "[a.b(x=1)]", "[f(x={1, 2})]",
                "[f(x=1)", "[f(x=1e999)]", "[f(x=1, x=2)]", "[]", "[f(x=1+2)]", "[f(x={1: 2})]",
                "[f(x=b'1')]", "<|python_start|>", "<|python_start|>print(1)", "[f(x=__import__('os'))]"]:
        check(P, bad, bad, [])
    p = P(None)
    assert p.feed("[f(a=']").calls == []
    assert p.feed("', b=1)").calls == []
    assert p.feed("]<|python").calls == [CallDelta(0, "f", '{"a": "]", "b": 1}')]
    assert p.finish() == ToolDelta(content="<|python")


IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda s: not __import__("keyword").iskeyword(s) and s not in ("true", "false", "null"))
PY_ARGS = st.dictionaries(IDENT, JSON_VALUE, max_size=4)


@st.composite
def pythonic_output(draw):
    lead = draw(st.sampled_from(["", " ", "\n"])) + draw(st.sampled_from(["", "<|python_start|>"]))
    if draw(st.booleans()):  # no call: prose (which may even look like a list)
        text = lead + draw(CONTENT)
        return text, (text if text.strip() else None), []
    calls, written = [], []
    for _ in range(draw(st.integers(1, 3))):
        name, args = draw(st.sampled_from(["get_weather", "f", "search_web"])), draw(PY_ARGS)
        write = repr if draw(st.booleans()) else lambda v: json.dumps(v, ensure_ascii=draw(st.booleans()))
        written.append(name + "(" + draw(st.sampled_from([", ", ","])).join(
            f"{k}={write(v)}" for k, v in args.items()) + ")")
        calls.append(call(name, args))
    text = lead + "[" + draw(st.sampled_from([", ", ",\n"])).join(written) + "]"
    space, end, extra = draw(st.sampled_from(["", " ", "\n"])), draw(st.booleans()), draw(CONTENT)
    text += space + ("<|python_end|>" if end else "") + extra
    rest = extra if end else space + extra  # whitespace before the end tag is dropped with it
    lead_ws = lead.replace("<|python_start|>", "")
    return text, (lead_ws + rest if rest.strip() else None), calls


@SETTINGS
@given(pythonic_output(), CUTS)
def test_pythonic_contract(out, cuts):
    contract(P, out, cuts)
