"""Hypothesis strategies for structured-output specs, and the checks of a completion against them.

Schemas cover objects (required and optional properties, closed), arrays, enums, nesting, integers
and numbers with bounds, strings with length bounds and patterns. Every piece is bounded so a
completion sampled at temperature 1.0 finishes well within max_tokens. Examples per test:
``JAXLLM_HYPOTHESIS_EXAMPLES`` (default 2; each example is one batch of 8 requests).
"""
from __future__ import annotations

import ast
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("JAXLLM_HYPOTHESIS_EXAMPLES", "2"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 2, database=None,
                    suppress_health_check=list(HealthCheck))

NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def scalar_schemas():
    lo = st.integers(-1000, 1000)
    return st.one_of(
        st.builds(lambda a, w: {"type": "integer", "minimum": a, "maximum": a + w}, lo, st.integers(0, 500)),
        st.builds(lambda a, w: {"type": "number", "minimum": a, "maximum": a + w}, lo, st.integers(1, 100)),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
        st.sampled_from([{"type": "string", "pattern": "^[a-z]{2,6}$"},
                         {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
                         {"type": "string", "pattern": "^(yes|no|maybe)$"}]),
        st.lists(st.one_of(NAMES, st.integers(-50, 50), st.booleans()), min_size=1, max_size=4,
                 unique=True).map(lambda xs: {"enum": xs}),
        st.just({"type": "boolean"}),
    )


def _object(children):
    def build(props, required):
        names = list(props)
        req = [n for n, r in zip(names, required) if r] or names[:1]
        return {"type": "object", "properties": props, "required": req, "additionalProperties": False}
    props = st.dictionaries(NAMES, children, min_size=1, max_size=4)
    return props.flatmap(lambda p: st.lists(st.booleans(), min_size=len(p), max_size=len(p)).map(
        lambda r: build(p, r)))


def json_schemas():
    """Objects whose values are scalars, arrays of scalars, or objects of scalars (depth <= 3)."""
    arrays = st.builds(lambda item, n: {"type": "array", "items": item, "minItems": 1, "maxItems": n},
                       scalar_schemas(), st.integers(1, 3))
    inner = st.one_of(scalar_schemas(), arrays, _object(scalar_schemas()))
    return _object(inner)


REGEX_PIECES = [r"[a-z]{1,5}", r"\d{1,4}", r"[A-Z]", r"(cat|dog|bird)", r"-", r"@", r"[aeiou]{2}", r"\.",
                r"(x|yz)?", r"[0-9a-f]{2,4}"]


def regexes():
    return st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=5).map("".join)


def choices():
    word = st.text("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789-_!?", min_size=1, max_size=12)
    return st.lists(word, min_size=1, max_size=5, unique=True)


ARITHMETIC = """start: expr
expr: term (("+" | "-") term){0,3}
term: factor (("*" | "/") factor){0,2}
factor: NUMBER | "(" inner ")"
inner: NUMBER (("+" | "-" | "*") NUMBER){1,2}
NUMBER: /[0-9]{1,3}/
"""


def is_arithmetic(text: str) -> bool:
    """The completion is an expression of ARITHMETIC: numbers, + - * /, one level of parentheses."""
    if not text or any(c not in "0123456789+-*/()" for c in text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    ok = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    return all(isinstance(n, ok) for n in ast.walk(tree)) and text.count("(") <= 3
