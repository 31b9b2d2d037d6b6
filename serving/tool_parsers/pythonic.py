"""``pythonic``: Python-call-list tool calls (Llama 3.2 / Llama 4 / ToolACE style).

Format: the output *starts* (after whitespace, and an optional ``<|python_start|>``) with a Python
list of calls with keyword arguments whose values are literals::

    [get_weather(city="Paris", days=3), get_time(tz='Europe/Paris', opts={"24h": True})]<|python_end|>

Values may be strings (any quoting, escapes, triple quotes), numbers (with a sign), ``True`` /
``False`` / ``None`` (or JSON's ``true`` / ``false`` / ``null``), lists, tuples (-> lists) and dicts
with string keys; they become the JSON arguments object. The list is read with ``ast.parse``,
never evaluated. A list that is not such calls (positional arguments, names, expressions, no
calls) is content, as is an output that does not start with ``[``. After the list, whitespace and
``<|python_end|>`` are dropped and any further text is content (vLLM would turn the whole output
into content there; a stream that already sent the calls cannot, so both paths keep the calls).

Streaming: the list is held until its closing bracket (strings and comments are skipped
incrementally), then its calls are released together. Nothing of it can go out earlier without
changing the whole parse's answer: one non-call element anywhere makes the whole list content, and
a literal's JSON is only known once it ends (``'a' 'b'`` is one string, ``1_0`` is 10).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from serving.tool_parsers.base import ToolCall, ToolDelta, ToolParser, dump_args
from serving.tool_parsers.scan import Scanner

START = "<|python_start|>"
END = "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None}
_SURROGATES = re.compile("[\ud800-\udfff]")


def _text(s: str) -> str:
    """A JSON-style ``"\\ud83d\\ude00"`` in Python source is two surrogates: join such pairs into
    the one character JSON means (lone surrogates stay; ``dump_args`` escapes them)."""
    if _SURROGATES.search(s):
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return s


class _NotLiteral(Exception):
    pass


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, float) and not math.isfinite(v):
            raise _NotLiteral
        if isinstance(v, str):
            return _text(v)
        if v is None or isinstance(v, (bool, int, float)):
            return v
        raise _NotLiteral  # bytes, complex, Ellipsis
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        v = node.operand.value
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise _NotLiteral  # **spread (k is None) or a non-string key
            out[_text(k.value)] = _value(v)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotLiteral


def python_literal(source: str) -> Any:
    """A Python literal's JSON value (``(1, 'a')`` -> ``[1, "a"]``, ``None`` -> null), read with
    ``ast.parse``, never evaluated; ValueError when ``source`` is not such a literal."""
    try:
        return _value(ast.parse(source.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError, _NotLiteral):
        raise ValueError(f"not a Python literal: {source[:40]!r}") from None


def parse_calls(source: str) -> list[ToolCall] | None:
    """``[f(a=1), g()]`` -> its calls; None when it is not a non-empty list of such calls."""
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for c in tree.elts:
        if not (isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args):
            return None
        args: dict[str, Any] = {}
        for kw in c.keywords:
            if kw.arg is None or kw.arg in args:  # **kwargs, or a repeated keyword
                return None
            try:
                args[kw.arg] = _value(kw.value)
            except (_NotLiteral, RecursionError):
                return None
        calls.append(ToolCall(c.func.id, dump_args(args)))
    return calls


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        # start: before the first non-whitespace; open: wants "["; list: inside it;
        # after: after the calls (whitespace, <|python_end|>); text: all content from here
        self._state = "start"
        self._hold = ""  # start / after: an end that may begin <|python_start|> / <|python_end|>
        self._raw: list[str] = []  # held text not yet content: the start tag, whitespace
        self._obj: list[str] = []  # list: its text so far
        self._scanner = Scanner(python=True)

    def _feed(self, delta: str, out: ToolDelta) -> None:
        while delta:
            state = self._state
            if state == "text":
                self._content(out, delta)
                return
            if state == "list":
                end = self._scanner.scan(delta)
                if end is None:
                    self._obj.append(delta)
                    return
                body = "".join(self._obj) + delta[:end]
                delta, self._obj = delta[end:], []
                calls = parse_calls(body)
                if calls is None:
                    self._to_text(out, body)
                else:
                    for c in calls:
                        self._call(out, c)
                    self._raw, self._state = [], "after"
                continue
            text, self._hold = self._hold + delta, ""
            rest = text.lstrip()
            if state == "start":
                self._content(out, text[: len(text) - len(rest)])  # whitespace: held by the base
            else:
                self._raw.append(text[: len(text) - len(rest)])
            if not rest:
                return
            tag = START if state == "start" else END if state == "after" else ""
            if tag and rest.startswith(tag):
                if state == "start":
                    self._raw.append(START)
                    self._state = "open"
                else:  # the end tag and the whitespace before it are dropped
                    self._raw, self._state = [], "text"
                delta = rest[len(tag):]
            elif tag and tag.startswith(rest):
                self._hold = rest
                return
            elif state in ("start", "open") and rest[0] == "[":
                self._state, self._scanner = "list", Scanner(python=True)
                delta = rest
            else:
                self._to_text(out, rest)
                return

    def _to_text(self, out: ToolDelta, rest: str) -> None:
        self._content(out, "".join(self._raw) + rest)
        self._raw, self._state = [], "text"

    def _finish(self, out: ToolDelta) -> None:
        self._content(out, "".join(self._raw) + "".join(self._obj) + self._hold)
