"""Structured outputs: what a request's completion must match (host side, no jax, no llguidance).

``StructuredOutputsParams`` is vLLM's: exactly one of ``json`` (a JSON schema, as a dict or its
JSON text), ``regex`` (the whole completion must match), ``choice`` (a list of strings, the
completion is one of them), ``grammar`` (a Lark grammar, llguidance's dialect) or
``json_object=True`` (any JSON object). ``validate()`` checks the shape (one kind set, the right
types) and raises ``ValueError("structured_outputs.<field>=<value> is invalid: <rule>")``; the
engine then checks the spec itself (a schema llguidance cannot compile, a bad regex or grammar)
with the same message shape before anything is scheduled (``jaxllm/engine/grammar.py``).

``reasoning_end`` (jaxllm's, not a vLLM field; the OpenAI server sets it under
``--reasoning-parser``): token ids that end a thinking model's reasoning, e.g. ``</think>``'s. The
constraint then holds only for the output after the first time they appear, in order, as those
tokens; before that every token is allowed (vLLM constrains only the text after the reasoning).
"""
from __future__ import annotations

import json

import msgspec

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_CHARS = 100_000  # a spec's text (schema JSON, regex, grammar, choices together)


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    json: dict | str | None = None  # JSON schema (dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance dialect)
    json_object: bool | None = None  # True: any JSON object
    reasoning_end: list[int] | None = None  # constrain only after these token ids (not part of the key)

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    def validate(self) -> "StructuredOutputsParams":
        kinds = self.kinds()
        if len(kinds) != 1:
            shown = ", ".join(f"{k}={_short(getattr(self, k))}" for k in kinds) or "nothing"
            raise ValueError(f"structured_outputs ({shown}) is invalid: set exactly one of "
                             f"{', '.join(KINDS)}")
        kind = kinds[0]
        value = getattr(self, kind)
        name = f"structured_outputs.{kind}"
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}={_short(value)} is invalid: not JSON ({e})") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"{name}={_short(value)} is invalid: a JSON schema must be an object")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}={_short(value)} is invalid: must be a non-empty string")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name}={_short(value)} is invalid: must be a non-empty list of strings")
            for c in value:
                if not isinstance(c, str) or not c:
                    raise ValueError(f"{name}={_short(value)} is invalid: every choice must be a non-empty string")
        elif value is not True:
            raise ValueError(f"{name}={value!r} is invalid: must be True or unset")
        end = self.reasoning_end
        if end is not None and (not isinstance(end, (list, tuple)) or not end or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in end)):
            raise ValueError(f"structured_outputs.reasoning_end={_short(end)} is invalid: must be None or a "
                             f"non-empty list of token ids (integers >= 0)")
        if len(self.spec_text()) > MAX_SPEC_CHARS:
            raise ValueError(f"{name} of {len(self.spec_text())} characters is invalid: at most "
                             f"{MAX_SPEC_CHARS}")
        return self

    def spec_text(self) -> str:
        """The spec as one canonical string (the grammar cache's key, with the kind)."""
        v = getattr(self, self.kind)
        if self.kind == "json":
            return json.dumps(json.loads(v) if isinstance(v, str) else v, sort_keys=True, separators=(",", ":"))
        if self.kind == "choice":
            return json.dumps(list(v))
        if self.kind == "json_object":
            return "true"
        return v

    def key(self) -> tuple[str, str]:
        return self.kind, self.spec_text()


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
