"""The structured-output fields of the completions and chat bodies (no jax): OpenAI's
``response_format``, vLLM's ``structured_outputs`` and vLLM's older ``guided_*`` names, resolved to
one ``StructuredOutputsParams``.

Two sources, as vLLM resolves them: ``structured_outputs`` set, the ``guided_*`` fields are unused
(vLLM forwarded them only without it; current vLLM no longer reads them at all); else two ``guided_*``
kinds are a 400 (vLLM's ``StructuredOutputsParams`` refuses two kinds). A ``response_format`` of type
``json_schema`` / ``json_object`` then replaces that constraint's ``json`` / ``json_object`` (vLLM's
``structured_outputs_from_response_format``): it wins over ``guided_*`` and over the same kind in
``structured_outputs``; another kind there is a 400 naming both (vLLM: "You can only use one kind of
structured outputs constraint").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from jaxllm.structured_outputs import StructuredOutputsParams

from serving.openai_compat import Body, _shown

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # -> json, regex, choice, grammar


class JsonSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """OpenAI's ``response_format``: ``text`` (free), ``json_object`` (any JSON object) or
    ``json_schema`` (``{"json_schema": {"name", "schema", "strict"}}``); vLLM's ``structural_tag``
    (``structures``, ``triggers``, or newer ``format``) is parsed only to be refused by name."""
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list | None = None
    triggers: list | None = None
    format: Any = None


class StructuredOutputsBody(Body):
    """vLLM's extra body field ``structured_outputs`` (its ``StructuredOutputsParams``)."""
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options: accepted where they change nothing here, refused otherwise (structured())
    disable_fallback: bool | None = None  # one backend, no fallback
    disable_any_whitespace: bool | None = None  # JSON is always generated without free whitespace here
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class StructuredFields(Body):
    # OpenAI's response_format, or vLLM's structured_outputs, or vLLM's older guided_* (one of them)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted, unused: one backend (llguidance)
    guided_whitespace_pattern: str | None = None  # refused
    structural_tag: str | None = None  # vLLM's older top-level field: refused

    def structured(self) -> StructuredOutputsParams | None:
        """The request's constraint, or None; ValueError (naming the fields) for two kinds of
        constraint or one this server cannot honour (vLLM's precedence: the module's docstring)."""
        rf, so = self.response_format, self.structured_outputs
        _refuse_unsupported(self)
        if so is not None:
            kinds = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                       ("grammar", so.grammar), ("json_object", so.json_object)) if v is not None}
            if len(kinds) > 1:
                raise ValueError(f"structured_outputs sets {' and '.join(kinds)}, which is invalid: set one kind "
                                 "of constraint")
            source = "structured_outputs"
        else:
            guided = [g for g in GUIDED if getattr(self, g) is not None]
            if len(guided) > 1:
                raise ValueError(f"{' and '.join(guided)} are invalid together: set one guided_* field "
                                 "(or structured_outputs)")
            kinds = {g.removeprefix("guided_"): getattr(self, g) for g in guided}
            source = guided[0] if guided else None
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                kind, value = "json_object", True
            elif rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema.schema is required for type 'json_schema'")
            else:
                kind, value = "json", rf.json_schema.schema_
            if source == "structured_outputs" and kinds and kind not in kinds:
                raise ValueError(f"response_format type {rf.type!r} and structured_outputs.{next(iter(kinds))} "
                                 f"are invalid together: set one kind of constraint")
            kinds = {kind: value}  # vLLM: response_format's value replaces the same kind (and guided_*)
        if not kinds:  # an empty structured_outputs: its validation refuses it, as vLLM's
            return StructuredOutputsParams() if source == "structured_outputs" else None
        return StructuredOutputsParams(**kinds)


def _refuse_unsupported(body: StructuredFields) -> None:
    rf, so = body.response_format, body.structured_outputs
    why = None
    if rf is not None and rf.type == "structural_tag":
        why = "response_format.type='structural_tag'", "structural tags are not supported by this server"
    elif body.structural_tag is not None:
        why = f"structural_tag={_shown(body.structural_tag)}", "structural tags are not supported by this server"
    elif so is not None and so.structural_tag is not None:
        why = (f"structured_outputs.structural_tag={_shown(so.structural_tag)}",
               "structural tags are not supported by this server")
    elif body.guided_whitespace_pattern is not None:
        why = (f"guided_whitespace_pattern={_shown(body.guided_whitespace_pattern)}",
               "JSON is generated without free whitespace here")
    elif so is not None and so.whitespace_pattern is not None:
        why = (f"structured_outputs.whitespace_pattern={_shown(so.whitespace_pattern)}",
               "JSON is generated without free whitespace here")
    elif so is not None and so.disable_additional_properties:
        why = ("structured_outputs.disable_additional_properties=True",
               "set additionalProperties: false in the schema itself")
    if why is not None:
        raise ValueError(f"{why[0]} is not supported: {why[1]}")
