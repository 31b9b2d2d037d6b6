"""Raw parameter text -> a JSON value, by the parameter's type in the tool's JSON schema.

For the parsers whose calls write each argument as plain text (``qwen3_coder``'s
``<parameter=city>\\nParis\\n</parameter>``), as vLLM's Qwen3-Coder parser converts them:

* ``string`` (and vLLM's aliases ``str``, ``text``, ``varchar``, ``char``, ``enum``): the text as
  it is (``"null"`` stays a string unless the schema admits null);
* ``integer`` (anything starting ``int``, ``uint``, ``long``, ``short``, ``unsigned``): ``int``;
* ``number`` (starting ``num`` or ``float``): an integer when the text is one, else a float, and a
  float with no fraction becomes an integer (``3.0`` -> ``3``, as vLLM); NaN and infinities are
  not JSON, so they stay text;
* ``boolean`` (``bool``, ``binary``): ``true`` / ``false`` in any case;
* ``object``, ``array`` and any other type: JSON, else a Python literal (``{'a': (1, None)}`` ->
  ``{"a": [1, null]}``, read by ``pythonic.python_literal``, never evaluated);
* ``null`` or ``None`` (any case; chat templates write a Python ``None`` as ``None``, as they
  write ``True``) is null for every type but a string that does not admit null;
* a parameter the schema does not list, one without a ``type``, or a call with no schema (an
  unknown function): JSON, else the text.

A value that does not convert stays the text (vLLM's fallback; except that vLLM turns a
non-boolean into ``false``, and answers the raw text for a parameter its schema does not list;
older vLLM releases also made ``"null"`` null for strings and read only ``type``).
The type is ``type`` (the first one that is not ``"null"`` when it is a list) or, without it,
the first typed branch of ``anyOf`` / ``oneOf``; a ``"null"`` among them admits null.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from serving.tool_parsers.base import dump_args
from serving.tool_parsers.pythonic import python_literal

STRING = frozenset({"string", "str", "text", "varchar", "char", "enum"})
INTEGER = ("int", "uint", "long", "short", "unsigned")
NUMBER = ("num", "float")
BOOLEAN = frozenset({"boolean", "bool", "binary"})


def properties(tools: list[dict] | None, name: str) -> dict | None:
    """The ``parameters.properties`` of the tool called ``name``; None when there is no such
    tool or it lists no properties (then every value is read as untyped)."""
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            return props if isinstance(props, dict) else None
    return None


def schema_type(schema: Any) -> tuple[str | None, bool]:
    """(the type's name in lower case or None when untyped, whether null is admitted)."""
    if not isinstance(schema, dict):
        return None, False
    t = schema.get("type")
    if isinstance(t, str):
        types = [t]
    elif isinstance(t, list):
        types = [x for x in t if isinstance(x, str)]
    else:
        branches = schema.get("anyOf") or schema.get("oneOf") or []
        types = [b["type"] for b in branches if isinstance(b, dict) and isinstance(b.get("type"), str)]
    types = [x.strip().lower() for x in types]
    nullable = "null" in types
    rest = [x for x in types if x != "null"]
    return (rest[0] if rest else "null" if nullable else None), nullable


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str) -> Any:
    """Strict JSON (NaN / Infinity are not JSON); ValueError when ``text`` is not JSON."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def convert(text: str, schema: Any) -> Any:
    """``text`` (one parameter's raw value) as the JSON value its ``schema`` asks for."""
    kind, nullable = schema_type(schema)
    if kind is None:
        try:
            return loads(text)
        except ValueError:
            return text
    is_null = text.lower() in ("null", "none")
    if kind in STRING:
        return None if nullable and is_null else text
    if is_null:
        return None
    if kind.startswith(INTEGER):
        try:
            return int(text)
        except ValueError:  # also a number of more than sys.get_int_max_str_digits() digits
            return text
    if kind.startswith(NUMBER):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            f = float(text)
        except ValueError:
            return text
        if not math.isfinite(f):
            return text
        return int(f) if f.is_integer() else f
    if kind in BOOLEAN:
        low = text.strip().lower()
        return True if low == "true" else False if low == "false" else text
    for read in (loads, python_literal):
        try:
            return read(text)
        except ValueError:
            pass
    return text


WAIT_LIMIT = 64  # characters an untyped or nullable value may stay undecided; then it goes out whole
_JSON_WS = " \t\n\r"
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED = re.compile('["\\\\\x00-\x1f\ud800-\udfff]')  # what a JSON string writes otherwise


def string_mode(schema: Any) -> str:
    """How a value of this parameter can stream: ``"stream"`` (it is a string whatever its text),
    ``"wait"`` (it may be one: ask ``stays_text`` as its text comes) or ``"whole"``."""
    kind, nullable = schema_type(schema)
    if kind is None or (kind in STRING and nullable):
        return "wait"
    return "stream" if kind in STRING else "whole"


def stays_text(head: str, schema: Any) -> bool | None:
    """For a ``"wait"`` parameter whose value begins with ``head``: True when ``convert`` answers
    the text itself whatever follows, False when that may not be so (or ``head`` is past
    ``WAIT_LIMIT`` undecided), None when more text must tell."""
    kind, _ = schema_type(schema)
    if kind is not None:  # a nullable string: text unless it is null / None
        low = head.lower()
        return None if "null".startswith(low) or "none".startswith(low) else True
    s = head.lstrip(_JSON_WS)  # untyped: text once no ending can make it JSON
    if not s:
        verdict = None
    elif s[0] in '{["-0123456789"':
        verdict = False
    elif s[0] in "tfn":
        lit = {"t": "true", "f": "false", "n": "null"}[s[0]]
        if lit.startswith(s) or (s.startswith(lit) and not s[len(lit):].strip(_JSON_WS)):
            verdict = None
        else:
            verdict = True
    else:
        verdict = True
    return False if verdict is None and len(head) > WAIT_LIMIT else verdict


def string_chars(text: str) -> str:
    """``text`` as inside a JSON string, character by character (so pieces join to the whole):
    as ``json.dumps(ensure_ascii=False)`` writes it, but a lone surrogate written as ``\\udXXX``."""
    if not _ESCAPED.search(text):
        return text
    chars = json.dumps(text, ensure_ascii=False)[1:-1]
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", chars) if _SURROGATE.search(chars) else chars


def dump(value: Any) -> str:
    """JSON text of a value, characters as they are unless a lone surrogate forbids it (base.dump_args)."""
    return dump_args(value)
