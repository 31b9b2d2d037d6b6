"""The body of ``POST /v1/responses`` (OpenAI's Responses API) and its translation into a chat
body (no jax): the Responses door is the chat path with another wire format, so the prompt is
rendered by the chat template and tools, structured outputs and the reasoning parser are the
chat door's own (serving/openai_generate.chat_job).

Translation (vLLM's): ``instructions`` -> a leading system message; ``input`` a string -> one
user message; ``input`` items -> messages in order: a message item (``type`` "message" or absent;
role user/system/developer/assistant; content a string or ``input_text`` / ``output_text``
parts), ``function_call`` -> an assistant message with that tool call (consecutive calls share
one), ``function_call_output`` -> a ``role: "tool"`` message, ``reasoning`` (an earlier answer's
item sent back) -> dropped, as chat templates drop earlier turns' reasoning. ``tools`` (flat
function tools) -> chat tools; ``tool_choice`` ``{"type": "function", "name"}`` -> named;
``max_output_tokens`` -> ``max_tokens``; ``text.format`` -> ``response_format``.

Logprobs (OpenAI's and vLLM's rule): ``include: ["message.output_text.logprobs"]`` asks for
them (the chat body's ``logprobs: true``), ``top_logprobs`` (0-20, default 0) is how many
alternatives each token gets (the chat body's ``top_logprobs``); ``top_logprobs`` without that
``include`` returns none.

Refused with a 400 naming the field (a server without state or built-in tools):
``previous_response_id``, ``conversation``, ``background: true``, ``prompt``, another
``include`` value, ``truncation: "auto"``, ``max_tool_calls``, built-in tool types, images,
files and audio. ``store`` is accepted and ignored (vLLM's default ``true``: without its
``VLLM_ENABLE_RESPONSES_API_STORE`` vLLM silently does not store either); the answer says
``store: false``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_ROLES = ("user", "system", "developer", "assistant")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TEXT_PARTS = ("input_text", "output_text", "text")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionTool(_Body):
    """A Responses function tool (flat: no ``function`` wrapper)."""
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Body):
    type: str
    name: str | None = None


class TextFormat(_Body):
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "name", "schema", "strict", "description"}`` (flat)."""
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, unused


class ReasoningConfig(_Body):
    """``reasoning``: accepted and echoed; the reasoning parser (a server flag) decides the split."""
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True  # vLLM's default; nothing is stored (see the module docstring)
    metadata: dict[str, str] | None = None  # echoed
    user: str | None = None  # accepted, unused
    service_tier: str | None = None  # accepted, unused
    # refused unless unset / their default (a one-line 400 naming them)
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    priority: int = 0
    request_id: str | None = None  # vLLM's: the answer's id is resp_<it> (X-Request-Id wins)
    cache_salt: str | None = None  # vLLM's: the prefix cache is shared only with the same salt
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM's: accepted, unused (text-only server)

    def refused(self) -> tuple[str, str] | None:
        """(message, field) of the first field this server cannot honour, else None."""
        if self.previous_response_id is not None:
            return (f"previous_response_id={self.previous_response_id!r} is not supported: this server "
                    "stores no responses; send the whole conversation in input", "previous_response_id")
        if self.conversation is not None:
            return "conversation is not supported: this server stores no conversations; send them in input", \
                "conversation"
        if self.background:
            return "background=true is not supported: this server stores no responses (answer in the request)", \
                "background"
        if self.prompt is not None:
            return "prompt is not supported: this server has no stored prompt templates", "prompt"
        for i, value in enumerate(self.include or ()):
            if value != LOGPROBS_INCLUDE:
                return (f"include[{i}]={value!r} is not supported: this server adds only "
                        f"{LOGPROBS_INCLUDE!r}", "include")
        if self.truncation == "auto":
            return "truncation='auto' is not supported: a prompt longer than the model's limit is refused", \
                "truncation"
        if self.max_tool_calls is not None:
            return f"max_tool_calls={self.max_tool_calls} is not supported: this server runs no built-in tools", \
                "max_tool_calls"
        return None

    # ----- translation ---------------------------------------------------------------------------
    def output_logprobs(self) -> bool:
        """Whether the answer's output_text parts carry logprobs (``include`` names them)."""
        return LOGPROBS_INCLUDE in (self.include or ())

    def chat_body(self) -> dict:
        """The /v1/chat/completions body this request is (ValueError naming the Responses field)."""
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": self.stream,
                                "priority": self.priority}
        if self.output_logprobs():
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                     "parallel_tool_calls", "cache_salt"):
            v = getattr(self, name)
            if v is not None:
                body[name] = v
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools is not None:
            body["tools"] = [self._tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            c = self.tool_choice
            if isinstance(c, str):
                body["tool_choice"] = c
            else:
                if c.type != "function" or not c.name:
                    raise ValueError(f"tool_choice.type={c.type!r} is not supported: use 'none', 'auto', "
                                     "'required' or {'type': 'function', 'name': ...}")
                body["tool_choice"] = {"type": "function", "function": {"name": c.name}}
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                body["response_format"] = {"type": "json_object"}
            else:
                if fmt.schema_ is None:
                    raise ValueError("text.format.schema is required for type 'json_schema'")
                js = {"name": fmt.name or "response", "schema": fmt.schema_}
                if fmt.strict is not None:
                    js["strict"] = fmt.strict
                body["response_format"] = {"type": "json_schema", "json_schema": js}
        return body

    @staticmethod
    def _tool(i: int, t: FunctionTool) -> dict:
        if t.type != "function":
            raise ValueError(f"tools[{i}].type={t.type!r} is not supported: this server has no built-in "
                             "tools (only 'function')")
        if not t.name:
            raise ValueError(f"tools[{i}].name is required for a function tool")
        fn: dict[str, Any] = {"name": t.name}
        for k in ("description", "parameters", "strict"):
            v = getattr(t, k)
            if v is not None:
                fn[k] = v
        return {"type": "function", "function": fn}

    def messages(self) -> list[dict]:
        out: list[dict] = []
        if self.instructions is not None:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            out.append({"role": "user", "content": self.input})
            return out
        if not self.input:
            raise ValueError("input=[] is invalid: must hold at least one item")
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                out.append(_message(i, item))
            elif kind == "function_call":
                call = {"id": _str(i, item, "call_id"), "type": "function",
                        "function": {"name": _str(i, item, "name"), "arguments": _str(i, item, "arguments")}}
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                    last["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(output, str):
                    raise ValueError(f"input[{i}].output={_short(output)} is invalid: must be a string")
                out.append({"role": "tool", "tool_call_id": _str(i, item, "call_id"), "content": output})
            elif kind == "reasoning":
                continue  # an earlier answer's reasoning sent back: templates drop it from history
            else:
                raise ValueError(f"input[{i}].type={kind!r} is not supported: use 'message', 'function_call', "
                                 "'function_call_output' or 'reasoning'")
        return out


def _message(i: int, item: dict) -> dict:
    role = item.get("role")
    if role not in _ROLES:
        raise ValueError(f"input[{i}].role={_short(role)} is invalid: must be one of {', '.join(_ROLES)}")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise ValueError(f"input[{i}].content[{j}].type={_short(kind)} is not supported: only text "
                                 "parts ('input_text', 'output_text') are (no images, files or audio)")
            texts.append(part["text"])
        text = "".join(texts)
    else:
        raise ValueError(f"input[{i}].content={_short(content)} is invalid: must be a string or a list of "
                         "text parts")
    return {"role": "system" if role == "developer" else role, "content": text}


def _str(i: int, item: dict, key: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise ValueError(f"input[{i}].{key}={_short(v)} is invalid: must be a string")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
