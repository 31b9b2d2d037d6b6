"""The messages a jaxllm.v1.Generation client sends and what it makes of the answers: `build_request`
(a GenerateRequest from a prompt, chat or token ids plus SamplingParams fields), `classify_request`
(a ClassifyRequest from prompts as `LLM.classify` takes them) and `Completion` (a
stream of GenerateResponses accumulated per sample: text, token ids, logprobs, finish and stop
reasons, tool calls, reasoning, usage). Transport-free; serving/client.py holds the sync and asyncio clients.
"""

from __future__ import annotations

import dataclasses
import json

from serving.proto.jaxllm.v1 import generation_pb2 as pb

FINISH_NAMES = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
                pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort",
                pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
SAMPLING_FIELDS = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def build_request(prompt: str | None = None, *, text: str | None = None, chat: list[dict] | None = None,
                  token_ids: list[int] | None = None, request_id: str = "", lora_name: str = "",
                  tools: list[dict] | None = None, tool_choice: str = "", priority: int = 0,
                  **sampling) -> pb.GenerateRequest:
    """One of prompt (or `text`, the proto's name for it)/chat/token_ids, plus any SamplingParams
    field (None = engine default); `lora_name`: a served LoRA adapter ("" = the base model);
    `tools` (OpenAI's list) and `tool_choice` ("none" | "auto" | "required" | a function name),
    with `chat`: tool calling as /v1/chat/completions does it; `priority`: vLLM's request priority
    (lower first; a server run with --scheduling-policy priority)."""
    if (tools is not None or tool_choice) and chat is None:
        raise ValueError("tools/tool_choice are invalid without chat: tool calls are a chat feature")
    if prompt is not None and text is not None:
        raise ValueError("give prompt or text, not both (text is the proto's name for prompt)")
    prompt = text if prompt is None else prompt
    if sum(x is not None for x in (prompt, chat, token_ids)) != 1:
        raise ValueError("give exactly one of prompt (text), chat or token_ids")
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling fields: {sorted(unknown)}")
    sp = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(sp.get("stop"), str):
        sp["stop"] = [sp["stop"]]
    if "structured_outputs" in sp:  # a StructuredOutputsParams, or a dict of its fields
        sp["structured_outputs"] = structured_outputs_to_proto(sp["structured_outputs"])
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sp), lora_name=lora_name,
                             priority=priority)
    if prompt is not None:
        req.text = prompt
    elif chat is not None:
        req.chat.messages.extend(chat_message(m) for m in chat)
        if tools is not None:
            req.chat.tools_json = json.dumps(tools)
        req.chat.tool_choice = tool_choice
    else:
        req.token_ids.ids.extend(token_ids)
    return req


def classify_request(prompts: str | list[str] | list[int] | list[list[int]], *, activation: bool | None = None,
                     truncate_prompt_tokens: int | None = None, request_id: str = "") -> pb.ClassifyRequest:
    """A ClassifyRequest from ``prompts`` as ``LLM.classify`` and HTTP /classify's ``input`` take them: a
    text, a list of texts, one prompt's token ids or a list of token-id lists (one result per prompt);
    ``activation=False``: the raw logits; None fields are left unset (the server's default)."""
    req = pb.ClassifyRequest(request_id=request_id)
    if isinstance(prompts, str):
        req.text = prompts
    elif not prompts:
        raise ValueError("prompts=[] is invalid: give a text, texts, token ids or token-id lists")
    elif isinstance(prompts[0], str):
        req.texts.extend(prompts)
    elif isinstance(prompts[0], int):
        req.token_ids.ids.extend(prompts)
    else:
        req.token_id_lists.extend(pb.TokenIds(ids=ids) for ids in prompts)
    if activation is not None:
        req.activation = activation
    if truncate_prompt_tokens is not None:
        req.truncate_prompt_tokens = truncate_prompt_tokens
    return req


def chat_message(m: dict) -> pb.ChatMessage:
    """An OpenAI chat message dict (as /v1/chat/completions takes it: ``content`` may be None,
    an assistant's ``tool_calls`` with ``function.name``/``arguments``, a tool message's
    ``tool_call_id``) as the proto's ChatMessage."""
    msg = pb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_call_id=m.get("tool_call_id") or "")
    for c in m.get("tool_calls") or ():
        fn = c["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
        msg.tool_calls.add(id=c.get("id", ""), name=fn["name"], arguments=args)
    return msg


def structured_outputs_to_proto(so) -> pb.StructuredOutputs:
    """StructuredOutputsParams (or a dict of its fields) -> the proto's oneof; a JSON schema goes as text."""
    fields = so if isinstance(so, dict) else {k: getattr(so, k) for k in so.__struct_fields__}
    msg = pb.StructuredOutputs()
    for kind, value in fields.items():
        if value is None:
            continue
        if kind == "json":
            msg.json = value if isinstance(value, str) else json.dumps(value)
        elif kind == "choice":
            msg.choice.choices.extend(value)
        else:
            setattr(msg, kind, value)
    return msg


@dataclasses.dataclass
class Completion:
    request_id: str = ""
    texts: dict[int, str] = dataclasses.field(default_factory=dict)
    token_ids: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    finish_reasons: dict[int, str | None] = dataclasses.field(default_factory=dict)
    stop_reasons: dict[int, int | str | None] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, list] = dataclasses.field(default_factory=dict)  # pb.TokenLogprobs per token
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_logprobs: list = dataclasses.field(default_factory=list)  # pb.PromptTokenLogprobs per token
    usage: pb.Usage | None = None
    num_responses: int = 0
    # chat with tools: per sample, the text outside calls and the calls ({"id", "name", "arguments"})
    contents: dict[int, str] = dataclasses.field(default_factory=dict)
    tool_calls: dict[int, list[dict]] = dataclasses.field(default_factory=dict)
    # chat under --reasoning-parser: per sample, the think block's text
    reasonings: dict[int, str] = dataclasses.field(default_factory=dict)

    def add(self, resp: pb.GenerateResponse) -> None:
        self.num_responses += 1
        self.request_id = resp.request_id
        if resp.prompt_token_ids:
            self.prompt_token_ids = list(resp.prompt_token_ids)
        if resp.prompt_logprobs:
            self.prompt_logprobs = list(resp.prompt_logprobs)
        for d in resp.outputs:
            self.texts[d.index] = self.texts.get(d.index, "") + d.text
            self.token_ids.setdefault(d.index, []).extend(d.token_ids)
            self.logprobs.setdefault(d.index, []).extend(d.logprobs)
            if d.content:
                self.contents[d.index] = self.contents.get(d.index, "") + d.content
            if d.reasoning:
                self.reasonings[d.index] = self.reasonings.get(d.index, "") + d.reasoning
            calls = self.tool_calls.setdefault(d.index, []) if d.tool_calls else ()
            for c in d.tool_calls:
                if c.index == len(calls):
                    calls.append({"id": c.id, "name": c.name, "arguments": ""})
                calls[c.index]["arguments"] += c.arguments
            if d.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                self.finish_reasons[d.index] = FINISH_NAMES[d.finish_reason]
                kind = d.WhichOneof("stop_reason")
                self.stop_reasons[d.index] = getattr(d, kind) if kind else None
        if resp.finished:
            self.usage = resp.usage

    @property
    def text(self) -> str:
        return self.texts.get(0, "")
