"""Chat on the gRPC door (no jax): the HTTP door's chat path behind a proto shape.

A Generate request whose prompt is ``chat`` becomes a /v1/chat/completions body
(``ChatCompletionRequest``), so everything after is serving/openai_tools.py's and
serving/openai_reasoning.py's, not a copy: the history's conversion (assistant ``tool_calls`` with
their arguments handed to the template as objects, ``role: "tool"`` messages with
``tool_call_id``), the template rendering (``--chat-template``, ``chat_template_kwargs``, the
tools), the tool checks and the tool schema's constraint (named, ``"required"``), the
``--tool-call-parser`` reader (``"auto"``), and under ``--reasoning-parser`` the think-block split
(a constraint starting after the reasoning). Each CompletionDelta's new text then goes through
the same per-choice readers as HTTP's stream: ``reasoning`` (the think block's text), ``content``
and ``tool_calls`` carry what the HTTP delta would, ``text`` stays the raw text, and a choice
that made a call under ``"auto"``/``"required"`` ends with FINISH_REASON_TOOL_CALLS.
``sampling.structured_outputs`` with a named/required ``tool_choice`` is refused, as
``response_format`` is over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic

from serving import convert
from serving.openai_protocol import ChatCompletionRequest
from serving.openai_reasoning import ReasoningPlan
from serving.openai_tools import ToolPlan, render_body
from serving.proto.jaxllm.v1 import generation_pb2 as pb

_NAMES = {v: k for k, v in convert.FINISH_REASONS.items()}


def chat_body(chat: pb.ChatMessages, sampling: pb.SamplingParams) -> ChatCompletionRequest:
    """The chat as a /v1/chat/completions body. ValueError naming the ``chat.`` field."""
    try:
        tools = json.loads(chat.tools_json) if chat.tools_json else None
    except ValueError as exc:
        raise ValueError(f"chat.tools_json is invalid: not JSON ({exc})") from None
    try:
        kwargs = json.loads(chat.chat_template_kwargs_json) if chat.chat_template_kwargs_json else None
    except ValueError as exc:
        raise ValueError(f"chat.chat_template_kwargs_json is invalid: not JSON ({exc})") from None
    choice: Any = chat.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    body: dict[str, Any] = {"messages": convert.chat_messages(chat), "tools": tools, "tool_choice": choice,
                            "chat_template_kwargs": kwargs}
    for name in ("parallel_tool_calls", "include_reasoning"):
        if chat.HasField(name):
            body[name] = getattr(chat, name)
    if sampling.HasField("skip_special_tokens"):
        body["skip_special_tokens"] = sampling.skip_special_tokens
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        named = {"tools": "chat.tools_json", "chat_template_kwargs": "chat.chat_template_kwargs_json"}
        field = named[loc[0]] + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:]) \
            if loc[:1] and loc[0] in named else "chat." + ".".join(loc)
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{field}={shown} is invalid: {err.get('msg')}") from None


class ChatPlan:
    """What a gRPC chat's answer goes through: the HTTP door's tool plan and reasoning plan
    (either None)."""

    def __init__(self, tools: ToolPlan | None, reasoning: ReasoningPlan | None):
        self.tools = tools
        self.reasoning = reasoning

    def explain(self, exc: Any) -> Any:
        return self.tools.explain(exc) if self.tools is not None else exc


def plan_request(request: pb.GenerateRequest, cfg: Any, tokenizer: Any,
                 params: Any) -> tuple[ChatPlan | None, dict | None]:
    """(the plan, the prompt rendered as HTTP's chat renders it) of a chat request; the plan is
    None when the answer is plain text (no tools, no reasoning parser); (None, None) when the
    prompt is not a chat. ``params`` gets the plans' constraint / special-token settings."""
    if request.WhichOneof("prompt") != "chat":
        return None, None
    body = chat_body(request.chat, request.sampling)
    tools = ToolPlan.from_body(body, cfg)
    if tools is not None and tools.mode != "auto" and params.structured_outputs is not None:
        raise ValueError(f"chat.tool_choice={request.chat.tool_choice!r} is invalid with "
                         "sampling.structured_outputs: the tool's schema already constrains the output; "
                         "set one of them")
    try:
        rendered = render_body(tokenizer, body, cfg)
    except ValueError as exc:  # "messages[0].role='' ..." -> the proto's field
        raise ValueError(convert.chat_field(str(exc))) from None
    reasoning = ReasoningPlan.from_body(body, cfg, rendered, tokenizer)
    if tools is not None:
        tools.adjust(params, body)
    if reasoning is not None:
        reasoning.adjust(params, body, tokenizer)
    plan = ChatPlan(tools, reasoning) if tools is not None or reasoning is not None else None
    return plan, {"prompt_token_ids": rendered["prompt_token_ids"]}


def render_ids(chat: pb.ChatMessages, cfg: Any, tokenizer: Any) -> list[int]:
    """The prompt token ids of ``chat`` as Generate renders it (Tokenize; HTTP's /tokenize)."""
    body = chat_body(chat, pb.SamplingParams())
    try:
        return render_body(tokenizer, body, cfg)["prompt_token_ids"]
    except ValueError as exc:
        raise ValueError(convert.chat_field(str(exc))) from None


def split(plan: ChatPlan, resp: pb.GenerateResponse, started: set[int], latest: dict) -> None:
    """Fill ``reasoning`` / ``content`` / ``tool_calls`` (and the tool_calls finish reason) of
    ``resp``'s deltas, and the final usage's ``reasoning_tokens`` (``latest``: the tracker's
    cumulative output per sample)."""
    rp, tools = plan.reasoning, plan.tools
    for out in resp.outputs:
        first = out.index not in started
        started.add(out.index)
        reason = _NAMES.get(out.finish_reason)
        reasoning, text = rp.delta(out.index, out.text, reason is not None) if rp is not None else ("", out.text)
        out.reasoning = reasoning
        if tools is None:
            out.content = text
            continue
        delta, reason = tools.delta(out.index, text, reason, first)
        out.content = delta.get("content") or ""
        for call in delta.get("tool_calls", ()):
            fn = call["function"]
            out.tool_calls.add(index=call["index"], id=call.get("id", ""), name=fn.get("name") or "",
                               arguments=fn.get("arguments") or "")
        if reason == "tool_calls":
            out.finish_reason = pb.FINISH_REASON_TOOL_CALLS
    if resp.finished and rp is not None:  # as the HTTP usage's completion_tokens_details
        resp.usage.reasoning_tokens = sum(rp.reasoning_tokens(o.text, o.token_ids, o.finish_reason == "stop")
                                          for o in latest.values())
