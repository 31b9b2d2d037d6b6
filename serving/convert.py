"""proto <-> engine objects (no jax): sampling params in, prompt in, deltas out.

Only the protobuf mapping lives here; the checks behind it (caps, token ids, chat rendering) are
``serving.frontdoor``'s and the delta logic is ``serving.deltas``', shared with the HTTP API."""

from __future__ import annotations

import logging
import re
from typing import Any

from jaxllm.generation_config import NONE as NO_DEFAULTS, GenerationDefaults
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams

from serving.config import ServerConfig
from serving.deltas import DeltaTracker, SampleDelta
from serving.frontdoor import apply_caps, check_token_ids
from serving.proto.jaxllm.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

# proto3 `optional` scalars: copied only when set, so unset = the engine's default
_OPTIONAL_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output", "truncate_prompt_tokens",
    "detokenize",
)

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def sampling_params_from_proto(msg: pb.SamplingParams, cfg: ServerConfig, *, vocab_size: int | None,
                               max_model_len: int | None,
                               defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
    """Build + validate (engine rules, then the server caps); raise ValueError('<field>=<value>
    is invalid: <limit>'). Unset optional fields take ``defaults`` (the model's generation config),
    as the HTTP bodies' unset fields do, then SamplingParams' own."""
    kw: dict[str, Any] = {f: getattr(msg, f) for f in _OPTIONAL_FIELDS if msg.HasField(f)}
    max_tokens_set = "max_tokens" in kw
    if msg.stop:
        kw["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kw["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.allowed_token_ids:
        kw["allowed_token_ids"] = list(msg.allowed_token_ids)
    if msg.logit_bias:
        kw["logit_bias"] = dict(msg.logit_bias)
    if msg.bad_words:
        kw["bad_words"] = list(msg.bad_words)
    if msg.HasField("structured_outputs"):
        kw["structured_outputs"] = structured_outputs_from_proto(msg.structured_outputs)
    return apply_caps(SamplingParams(**defaults.fill(kw)), cfg, vocab_size=vocab_size, max_model_len=max_model_len,
                      max_tokens_set=max_tokens_set)


def structured_outputs_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """The oneof as StructuredOutputsParams (validated with the rest: an empty oneof names the field)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        return StructuredOutputsParams()
    if kind == "choice":
        return StructuredOutputsParams(choice=list(msg.choice.choices))
    return StructuredOutputsParams(**{kind: getattr(msg, kind)})


def chat_messages(msg: pb.ChatMessages) -> list[dict[str, Any]]:
    """The messages as OpenAI chat message dicts (what /v1/chat/completions takes): role and
    content, an assistant turn's ``tool_calls`` (arguments as JSON text), a tool message's
    ``tool_call_id``."""
    out = []
    for m in msg.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_field(message: str) -> str:
    """A chat error message of the HTTP door's (``messages[0].tool_calls[0].function.arguments=...``)
    naming the proto's field instead (``chat.messages[0].tool_calls[0].arguments=...``)."""
    message = re.sub(r"^messages\b", "chat.messages", message)
    return re.sub(r"^(chat\.messages\[\d+\]\.tool_calls\[\d+\])\.function\.arguments", r"\1.arguments", message)


def prompt_from_request(req: pb.GenerateRequest, vocab_size: int | None, render_chat):
    """Return what ``engine.add_request`` takes: a str or {"prompt_token_ids": [...]};
    ``render_chat(chat)``: a chat's prompt token ids (serving/proto_tools.render_ids)."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is invalid: set one of text, chat or token_ids")
    if kind == "chat":
        return {"prompt_token_ids": render_chat(req.chat)}
    return text_or_token_ids(req, kind, vocab_size)


def salted(prompt, salt: str):
    """``prompt`` (a str or a prompt dict) with vLLM's ``cache_salt`` when ``salt`` is not empty (the
    engine checks it and keys the request's prefix-cache blocks on it: jaxllm/engine/intake.py)."""
    if not salt:
        return prompt
    return dict({"prompt": prompt} if isinstance(prompt, str) else prompt, cache_salt=salt)


def text_or_token_ids(req: Any, kind: str, vocab_size: int | None):
    """A request's ``text`` (non-empty) or checked ``token_ids`` oneof member, as the engine takes it
    (GenerateRequest and EmbedRequest share these two)."""
    if kind == "text":
        if req.text == "":
            raise ValueError("text='' is invalid: the prompt must be non-empty")
        return req.text
    return {"prompt_token_ids": check_token_ids("token_ids", req.token_ids.ids, vocab_size)}


# ----- outputs -> deltas -------------------------------------------------------------------
class ProtoDeltaTracker(DeltaTracker):
    """serving.deltas.DeltaTracker whose updates are GenerateResponse messages."""

    def __init__(self, request_id: str, params: SamplingParams):
        super().__init__(request_id, params)
        self._prompt_sent = False
        self._prompt_logprobs_sent = False

    def update(self, batch: list) -> pb.GenerateResponse | None:  # type: ignore[override]
        deltas = super().update(batch)
        out = self.last
        if out is None:
            return None
        resp = pb.GenerateResponse(request_id=self.request_id, finished=self.finished)
        if not self._prompt_sent:
            resp.prompt_token_ids.extend(out.prompt_token_ids)
            self._prompt_sent = True
        if not self._prompt_logprobs_sent and getattr(out, "prompt_logprobs", None) is not None:
            for entry in out.prompt_logprobs:
                item = resp.prompt_logprobs.add(present=entry is not None)
                if entry:
                    for tid, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
                        item.logprobs.add(token_id=int(tid), logprob=float(lp.logprob))
            self._prompt_logprobs_sent = True
        for d in deltas:
            resp.outputs.append(_to_proto(d))
        if self.finished:
            resp.usage.prompt_tokens = self.num_prompt_tokens
            resp.usage.completion_tokens = self.num_completion_tokens
            resp.usage.cached_tokens = self.num_cached_tokens
        if not resp.outputs and not self.finished and not resp.prompt_token_ids:
            return None
        return resp


def _to_proto(d: SampleDelta) -> pb.CompletionDelta:
    out = pb.CompletionDelta(index=d.index, token_ids=d.token_ids, text=d.text)
    for tid, own, entry in d.logprobs or ():
        tl = out.logprobs.add(token_id=tid, logprob=own)
        for k, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
            tl.top_logprobs.add(token_id=int(k), logprob=float(lp.logprob))
    if d.cumulative_logprob is not None:
        out.cumulative_logprob = d.cumulative_logprob
    if d.finish_reason is not None:
        out.finish_reason = FINISH_REASONS.get(d.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        sr = d.stop_reason
        if isinstance(sr, str):
            out.stop_string = sr
        elif isinstance(sr, int) and not isinstance(sr, bool):
            out.stop_token_id = sr
    return out
