"""Tool calling and chat-template fields of /v1/chat/completions (no jax), shaped like vLLM's.

* **Rendering**: ``tools`` reach the chat template as its ``tools`` variable (also with
  ``tool_choice="none"``, vLLM's default); assistant ``tool_calls`` have their ``arguments`` JSON
  text turned into a dict, as vLLM hands them to templates; ``role: "tool"`` messages keep their
  ``tool_call_id``. The template is the request's ``chat_template`` (only with
  ``--trust-request-chat-template``), else ``--chat-template``, else the model's.
* **tool_choice** (unset: ``"auto"`` with tools, else ``"none"``):
  ``{"type": "function", "function": {"name"}}`` constrains the output to that function's
  ``parameters`` schema (the structured-output path) and answers it as one tool call
  (``content=""``, finish_reason as the output's); ``"required"`` constrains it to a JSON array
  (``minItems`` 1, ``maxItems`` 1 without ``parallel_tool_calls``) of ``{"name", "parameters"}``
  objects, one ``anyOf`` branch per tool, parsed into tool calls (finish_reason ``"tool_calls"``);
  ``"auto"`` needs ``--enable-auto-tool-choice --tool-call-parser NAME`` and lets that parser
  (``serving/tool_parsers``) split the free text into content and calls; ``"none"`` is plain text.
* **One reader for both answers**: a choice's text goes through the same per-choice state whether
  streamed (fed chunk by chunk) or not (fed whole), so the openai client's accumulation of the
  stream equals the non-streamed message. A call's ``arguments`` are the JSON text the model wrote
  (named, required) or, under auto, the parsed object as ``json.dumps`` writes it.
  The readers, one per mode, are in serving/tool_readers.py.
"""

from __future__ import annotations

import copy
import os
import re
import uuid
from typing import Any

from jaxllm.structured_outputs import StructuredOutputsParams
from jaxllm.tokenizer import parse_tool_call_arguments

from serving.tool_readers import ArrayReader, NamedReader, ParserReader

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ANY_OBJECT = {"type": "object"}


# ----- templates -------------------------------------------------------------------------------
def load_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or the value itself when it looks like a template
    (vLLM's rule: it holds ``{``, ``}`` or a newline)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is invalid: no such file, and not an inline Jinja "
                     f"template (no '{{', '}}' or newline)")


def template_messages(messages: list) -> list[dict]:
    """The body's messages as templates get them: tool call arguments as dicts (vLLM's)."""
    return parse_tool_call_arguments([m.to_dict() for m in messages])


def render_body(tokenizer: Any, body: Any, cfg: Any) -> dict:
    """``{"prompt", "prompt_token_ids"}`` of a chat body (/v1/chat/completions or /tokenize)."""
    from serving.frontdoor import render_chat  # not at import: python -m serving --help stays light

    kw: dict[str, Any] = {}
    if body.chat_template is not None:
        if not cfg.trust_request_chat_template:
            raise ValueError("chat_template is invalid: this server does not take a chat template from "
                             "requests (start it with --trust-request-chat-template)")
        kw["chat_template"] = body.chat_template
    elif cfg.chat_template is not None:
        kw["chat_template"] = cfg.chat_template
    # --exclude-tools-when-tool-choice-none: a request that may not call tools does not show them to the model
    # (a /tokenize body has tools but no tool_choice)
    excluded = getattr(body, "tool_choice", None) == "none" and getattr(cfg, "exclude_tools_when_tool_choice_none", False)
    if body.tools and not excluded:
        kw["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    # --default-chat-template-kwargs, then vLLM's reasoning_effort (a template variable), then the request's
    # own chat_template_kwargs: the request wins
    variables = dict(getattr(cfg, "default_chat_template_kwargs", None) or {})
    if body.reasoning_effort is not None:
        variables["reasoning_effort"] = body.reasoning_effort
    variables.update(body.chat_template_kwargs or {})
    if variables:
        kw["chat_template_kwargs"] = variables
    if body.documents is not None:
        kw["documents"] = body.documents
    if body.continue_final_message:
        kw["continue_final_message"] = True
    out = render_chat(tokenizer, template_messages(body.messages),
                      add_generation_prompt=body.add_generation_prompt, **kw)
    if getattr(body, "add_special_tokens", False):  # vLLM's: BOS etc. on top of the template's rendering
        if out.get("prompt") is None:
            raise ValueError("add_special_tokens=True is invalid here: this model's tokenizer renders token "
                             "ids only")
        out = dict(out, prompt_token_ids=[int(t) for t in tokenizer.encode(out["prompt"], add_special_tokens=True)])
    return out


def check_parser_name(name: str) -> None:
    """``--tool-call-parser``: a name ``serving.tool_parsers.get_parser`` knows."""
    try:
        from serving.tool_parsers import get_parser
    except ImportError:
        raise ValueError(f"tool_call_parser={name!r} is invalid: this build has no tool parsers "
                         f"(serving/tool_parsers)") from None
    get_parser(name)  # ValueError("tool_call_parser='x' is invalid: must be one of ...")


# ----- the request's plan ------------------------------------------------------------------------
class ToolPlan:
    """What a chat body's tool fields ask for; None from :meth:`from_body` = plain text."""

    def __init__(self, mode: str, tools: list, name: str | None, parallel: bool, parser: str | None):
        self.mode = mode  # "named" | "required" | "auto"
        self.tools = tools  # [FunctionDefinition]
        self.name = name  # mode "named": the function
        self.parallel = parallel
        self.parser = parser
        self._streams: dict[int, _ChoiceStream] = {}  # choice index -> its stream state

    @classmethod
    def from_body(cls, body: Any, cfg: Any) -> "ToolPlan | None":
        """Checks the tool fields (ValueError naming the field); None when the answer is plain text."""
        tools = [t.function for t in body.tools or ()]
        names: list[str] = []
        for i, fn in enumerate(tools):
            if not _TOOL_NAME.fullmatch(fn.name):
                raise ValueError(f"tools[{i}].function.name={fn.name!r} is invalid: must be 1-64 characters "
                                 f"of a-z, A-Z, 0-9, '_' and '-'")
            if fn.name in names:
                raise ValueError(f"tools[{i}].function.name={fn.name!r} is invalid: tools[{names.index(fn.name)}] "
                                 f"has the same name")
            names.append(fn.name)
        choice = body.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        shown = choice if isinstance(choice, str) else {"function": {"name": choice.function.name}}
        if choice == "none" or (choice == "required" and body.tools == []):  # vLLM: required of [] = none
            return None
        if not tools:
            raise ValueError(f"tool_choice={shown!r} is invalid without tools: set tools, or tool_choice "
                             f"'none'")
        name = None
        if not isinstance(choice, str):
            name = choice.function.name
            if name not in names:
                raise ValueError(f"tool_choice.function.name={name!r} is invalid: tools has no such function "
                                 f"(it has {', '.join(names)})")
        if choice == "auto" and not (cfg.enable_auto_tool_choice and cfg.tool_call_parser):
            raise ValueError('tool_choice=\'auto\' is invalid on this server: "auto" tool choice requires '
                             '--enable-auto-tool-choice and --tool-call-parser to be set')
        if choice != "auto" and body.structured() is not None:
            raise ValueError(f"tool_choice={shown!r} is invalid with response_format/structured_outputs: the "
                             f"tool's schema already constrains the output; set one of them")
        mode = "auto" if choice == "auto" else "required" if choice == "required" else "named"
        parallel = body.parallel_tool_calls is not False
        return cls(mode, tools, name, parallel, cfg.tool_call_parser if mode == "auto" else None)

    def adjust(self, params: Any, body: Any) -> None:
        """The request's SamplingParams for this plan: named/required get the tools' constraint;
        auto decodes special tokens (parsers' markers such as ``[TOOL_CALLS]`` or
        ``<|python_tag|>`` are special in some vocabularies; vLLM's parsers do the same) unless
        the body set ``skip_special_tokens`` itself."""
        spec = self.structured()
        if spec is not None:
            params.structured_outputs = spec
        if self.mode == "auto" and body.skip_special_tokens is None:
            params.skip_special_tokens = False

    def structured(self) -> StructuredOutputsParams | None:
        """The output constraint of named and required (None for auto)."""
        if self.mode == "named":
            fn = next(t for t in self.tools if t.name == self.name)
            return StructuredOutputsParams(json=fn.parameters or _ANY_OBJECT)
        if self.mode != "required":
            return None
        defs: dict[str, Any] = {}
        branches = []
        for i, fn in enumerate(self.tools):
            params = copy.deepcopy(fn.parameters) if fn.parameters else dict(_ANY_OBJECT)
            for key, sub in (params.pop("$defs", None) or {}).items():  # "#/$defs/X" refs point at the root
                if key in defs and defs[key] != sub:
                    raise ValueError(f"tools[{i}].function.parameters.$defs.{key} is invalid: another tool "
                                     f"defines {key} differently (tool_choice 'required' merges them)")
                defs[key] = sub
            branches.append({"type": "object", "properties": {"name": {"type": "string", "enum": [fn.name]},
                                                              "parameters": params},
                             "required": ["name", "parameters"], "additionalProperties": False})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return StructuredOutputsParams(json=schema)

    def explain(self, exc: Any) -> Any:
        """An admission error about the constraint built from the tools, told as the tools' fault
        (``structured_outputs.json=... is invalid: why`` names no field the client sent)."""
        if (self.mode == "auto" or getattr(exc, "param", None) != "structured_outputs"
                or " is invalid: " not in exc.message):
            return exc  # auto: structured_outputs is the client's own
        why = exc.message.split(" is invalid: ", 1)[1]
        if self.mode == "named":
            i = next(i for i, t in enumerate(self.tools) if t.name == self.name)
            field, msg = "tools", f"tools[{i}].function.parameters is invalid for tool_choice {self.name!r}: {why}"
        else:
            field, msg = "tools", f"tools are invalid for tool_choice 'required': a parameters schema: {why}"
        return type(exc)(exc.code, msg, field)

    def _new_stream(self) -> "_ChoiceStream":
        if self.mode == "named":
            reader: Any = NamedReader(self.name)
        elif self.mode == "required":
            reader = ArrayReader()
        else:
            reader = ParserReader(self.parser, self.tools)
        return _ChoiceStream(reader, self.parallel)

    # ----- answers ----------------------------------------------------------------------------
    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The non-streamed ``message`` and finish_reason of one choice's whole text."""
        st = self._new_stream()
        content, calls = st.feed(text)
        more, rest = st.finish()
        content, calls = content + more, calls + rest
        merged: dict[int, dict] = {}
        for c in calls:
            if c["index"] in merged:
                merged[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
            else:
                merged[c["index"]] = {"id": c["id"], "type": "function", "function": dict(c["function"])}
        # vLLM's message always carries tool_calls ([] when no call was made)
        msg: dict[str, Any] = {"role": "assistant", "content": content or self._empty_content(),
                               "tool_calls": [merged[i] for i in sorted(merged)]}
        return msg, self._finish(finish_reason, bool(merged))

    def delta(self, index: int, text: str, finish_reason: str | None, first: bool) -> tuple[dict, str | None]:
        """The streamed ``delta`` and finish_reason of choice ``index``'s new text (``{}`` while the
        reader holds the text back)."""
        st = self._streams.get(index)
        if st is None:
            st = self._streams[index] = self._new_stream()
        content, calls = st.feed(text)
        if finish_reason is not None:
            more, rest = st.finish()
            content, calls = content + more, calls + rest
        d: dict[str, Any] = {}
        if first:
            d["role"] = "assistant"
            if self._empty_content() is not None:
                d["content"] = ""
        if content:
            d["content"] = d.get("content", "") + content
        if calls:
            d["tool_calls"] = calls
        return d, self._finish(finish_reason, st.called)

    def _empty_content(self) -> str | None:
        return "" if self.mode in ("named", "required") else None  # vLLM's content of forced calls

    def _finish(self, reason: str | None, called: bool) -> str | None:
        if reason is None or self.mode == "named":
            return reason
        if self.mode == "required":
            return "tool_calls" if reason == "stop" else reason
        return "tool_calls" if called else reason


class _ChoiceStream:
    """A reader's (content, [(call index, name on its first delta, arguments fragment)]) as
    OpenAI tool-call deltas, each call with its ``chatcmpl-tool-<hex>`` id on its first. Without
    ``parallel`` calls after the first are dropped (vLLM's ``parallel_tool_calls=false``: the
    model may write more; only the first is answered)."""

    def __init__(self, reader: Any, parallel: bool = True):
        self.reader = reader
        self.parallel = parallel
        self.called = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        return self._wire(*self.reader.feed(text))

    def finish(self) -> tuple[str, list[dict]]:
        return self._wire(*self.reader.finish())

    def _wire(self, content: str, calls: list[tuple[int, str | None, str]]) -> tuple[str, list[dict]]:
        out = []
        for index, name, args in calls:
            if index > 0 and not self.parallel:
                continue
            if name is not None:
                self.called = True
                out.append({"index": index, "id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
                            "function": {"name": name, "arguments": args}})
            elif args:
                out.append({"index": index, "function": {"arguments": args}})
        return content, out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
