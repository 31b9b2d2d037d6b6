"""serving/tool_parsers/scan.py: where a bracketed JSON / Python value ends, fed in any pieces.

Reference: the value is written by json.dumps / repr and followed by more text, so its end is
known; every split of the text must report exactly that end (absolute offset)."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.tool_parsers.scan import Scanner

STRINGS = st.lists(st.sampled_from(list("ab\"'\\{}[]()#\n é😀") + ["'''", '"""']),
                   max_size=6).map("".join)
VALUE = st.recursive(st.none() | st.booleans() | st.integers() | STRINGS,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(STRINGS, inner, max_size=3), max_leaves=10)
BRACKETED = st.lists(VALUE, max_size=3) | st.dictionaries(STRINGS, VALUE, max_size=3)
TRAILER = st.sampled_from(["", "]", "}", " {x", '"', "'", "; [1]"])
CUTS = st.lists(st.integers(0, 10**6), max_size=10)


def end_of(text: str, cuts: list[int], python: bool) -> int | None:
    points = sorted({c % (len(text) + 1) for c in cuts})
    s = Scanner(python)
    for a, b in zip([0] + points, points + [len(text)]):
        end = s.scan(text[a:b])
        if end is not None:
            assert 0 < end <= b - a
            return a + end
    return None


@settings(max_examples=300, deadline=None)
@given(BRACKETED, TRAILER, CUTS, st.booleans())
def test_json_value_end(value, trailer, cuts, ascii_only):
    body = json.dumps(value, ensure_ascii=ascii_only)
    assert end_of(body + trailer, cuts, python=False) == len(body)
    assert end_of(body[:-1], cuts, python=False) is None  # not closed yet


@settings(max_examples=300, deadline=None)
@given(BRACKETED, TRAILER, CUTS)
def test_python_value_end(value, trailer, cuts):
    body = repr(value)
    assert end_of(body + trailer, cuts, python=True) == len(body)
    assert end_of(body[:-1], cuts, python=True) is None


def test_python_triple_quotes_calls_and_comments():
    for body in ["[f(a='''x'')]''')]", '[g(s="""a"b""c\\"""")]', "[f(x='')]", '[f(x="")]',
                 "[f(x=''''''), g(y='''\\'''')]", "[f(a=1,  # ) ] comment\n b=2)]", "(1, {2: [3]})"]:
        for cuts in ([], list(range(len(body) + 1)), [3], [len(body) - 1]):
            assert end_of(body + "] tail", cuts, python=True) == len(body), (body, cuts)
