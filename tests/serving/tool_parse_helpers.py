"""Shared by the tool-parser tests: streaming fold with the delta rules, splits, worked-example
check, and hypothesis strategies for arguments and for how a model writes JSON."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from serving.tool_parsers import CallDelta, Extracted, ToolCall, ToolDelta, ToolParser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def call(name: str, args: dict) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def stream(cls: type[ToolParser], chunks: list[str], tools: list[dict] = TOOLS) -> Extracted:
    """Feed ``chunks`` in order then finish; check the delta rules; fold into an Extracted."""
    p = cls(tools)
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


def check(cls: type[ToolParser], text: str, content: str | None, calls: list[ToolCall],
          tools: list[dict] = TOOLS):
    """extract and three streamings (whole, one char at a time, two halves) all give the same."""
    want = Extracted(content, calls)
    assert cls(tools).extract(text) == want
    assert stream(cls, [text], tools) == want
    assert stream(cls, list(text), tools) == want
    assert stream(cls, [text[: len(text) // 2], text[len(text) // 2:]], tools) == want


JSON_LEAF = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=4)
DRAWN_NAMES = ("get_weather", "f", "search_web", "tool-2", "unknown_fn")
NAMES = st.sampled_from(DRAWN_NAMES)
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



SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def contract(cls: type[ToolParser], out: tuple[str, str | None, list[ToolCall]], cuts: list[int],
             tools: list[dict] = TOOLS):
    """A generated output (text, expected content, expected calls): extract and one split agree."""
    text, content, calls = out
    want = Extracted(content, calls)
    assert cls(tools).extract(text) == want
    assert stream(cls, split(text, cuts), tools) == want

