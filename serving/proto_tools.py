"""Tool calling on the gRPC door (no jax), the HTTP door's own plan behind a proto shape.

A Generate request whose ``chat`` sets ``tools_json`` (OpenAI's ``tools`` array as JSON text)
or ``tool_choice`` becomes a /v1/chat/completions body, so the checks, the template rendering
(the tools reach the chat template; ``--chat-template`` applies), the tool schema's constraint
(named, ``"required"``) and the ``--tool-call-parser`` reader (``"auto"``) are
serving/openai_tools.py's. Each CompletionDelta's new text then goes through the same per-choice
reader: ``content`` and ``tool_calls`` carry what the HTTP stream's delta would, ``text`` stays
the raw text, and a choice that made a call under ``"auto"``/``"required"`` ends with
FINISH_REASON_TOOL_CALLS. ``sampling.structured_outputs`` with a named/required ``tool_choice``
is refused, as ``response_format`` is over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic

from serving import convert
from serving.openai_protocol import ChatCompletionRequest
from serving.openai_tools import ToolPlan, render_body
from serving.proto.jaxllm.v1 import generation_pb2 as pb

_NAMES = {v: k for k, v in convert.FINISH_REASONS.items()}


def chat_body(chat: pb.ChatMessages, sampling: pb.SamplingParams) -> ChatCompletionRequest | None:
    """The chat as a /v1/chat/completions body when it sets tool fields; None when it does not.
    ValueError naming the ``chat.`` field."""
    if not chat.tools_json and not chat.tool_choice and not chat.HasField("parallel_tool_calls"):
        return None
    try:
        tools = json.loads(chat.tools_json) if chat.tools_json else None
    except ValueError as exc:
        raise ValueError(f"chat.tools_json is invalid: not JSON ({exc})") from None
    choice: Any = chat.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    body: dict[str, Any] = {"messages": convert.chat_messages(chat), "tools": tools, "tool_choice": choice}
    if chat.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = chat.parallel_tool_calls
    if sampling.HasField("skip_special_tokens"):
        body["skip_special_tokens"] = sampling.skip_special_tokens
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        field = "chat.tools_json" + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:]) \
            if loc[:1] == ["tools"] else "chat." + ".".join(loc)
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{field}={shown} is invalid: {err.get('msg')}") from None


def plan_request(request: pb.GenerateRequest, cfg: Any, tokenizer: Any,
                 params: Any) -> tuple[ToolPlan | None, dict | None]:
    """(the plan, the prompt rendered with the tools) of a chat request with tool fields; (None,
    None) without them. ``params`` gets the plan's constraint / special-token setting."""
    if request.WhichOneof("prompt") != "chat":
        return None, None
    body = chat_body(request.chat, request.sampling)
    if body is None:
        return None, None
    plan = ToolPlan.from_body(body, cfg)
    if plan is not None and plan.mode != "auto" and params.structured_outputs is not None:
        raise ValueError(f"chat.tool_choice={request.chat.tool_choice!r} is invalid with "
                         "sampling.structured_outputs: the tool's schema already constrains the output; "
                         "set one of them")
    prompt = {"prompt_token_ids": render_body(tokenizer, body, cfg)["prompt_token_ids"]}
    if plan is not None:
        plan.adjust(params, body)
    return plan, prompt


def split(plan: ToolPlan, resp: pb.GenerateResponse, started: set[int]) -> None:
    """Fill ``content`` / ``tool_calls`` (and the tool_calls finish reason) of ``resp``'s deltas."""
    for out in resp.outputs:
        first = out.index not in started
        started.add(out.index)
        delta, reason = plan.delta(out.index, out.text, _NAMES.get(out.finish_reason), first)
        out.content = delta.get("content") or ""
        for call in delta.get("tool_calls", ()):
            fn = call["function"]
            out.tool_calls.add(index=call["index"], id=call.get("id", ""), name=fn.get("name") or "",
                               arguments=fn.get("arguments") or "")
        if reason == "tool_calls":
            out.finish_reason = pb.FINISH_REASON_TOOL_CALLS
