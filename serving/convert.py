"""proto <-> engine objects (no jax): sampling params in, prompt in, deltas out."""

from __future__ import annotations

import logging
from typing import Any

from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams

from serving.config import ServerConfig
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
                               max_model_len: int | None) -> SamplingParams:
    """Build + validate; raise ValueError('<field>=<value> is invalid: <limit>')."""
    kw: dict[str, Any] = {f: getattr(msg, f) for f in _OPTIONAL_FIELDS if msg.HasField(f)}
    if msg.stop:
        kw["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kw["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.allowed_token_ids:
        kw["allowed_token_ids"] = list(msg.allowed_token_ids)
    if msg.logit_bias:
        kw["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        kw["structured_outputs"] = structured_outputs_from_proto(msg.structured_outputs)
    params = SamplingParams(**kw)
    params.validate(vocab_size=vocab_size)
    # server caps (after the engine's own rules, so out-of-domain values get its message)
    if params.n > cfg.max_n:
        raise ValueError(f"n={params.n} is invalid: exceeds the server limit --max-n={cfg.max_n}")
    cap = cfg.max_tokens_cap or max_model_len
    if cap is not None and "max_tokens" in kw and params.max_tokens > cap:
        flag = "--max-tokens-cap" if cfg.max_tokens_cap else "max_model_len"
        raise ValueError(f"max_tokens={params.max_tokens} is invalid: exceeds the server limit "
                         f"{flag}={cap}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(params, name)
        if v is not None and v > cfg.max_logprobs:
            raise ValueError(f"{name}={v} is invalid: exceeds the server limit "
                             f"--max-logprobs={cfg.max_logprobs}")
    if len(params.stop_strings) > cfg.max_stop_strings:
        raise ValueError(f"stop has {len(params.stop_strings)} strings, which is invalid: exceeds "
                         f"the server limit --max-stop-strings={cfg.max_stop_strings}")
    return params


def structured_outputs_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """The oneof as StructuredOutputsParams (validated with the rest: an empty oneof names the field)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        return StructuredOutputsParams()
    if kind == "choice":
        return StructuredOutputsParams(choice=list(msg.choice.choices))
    return StructuredOutputsParams(**{kind: getattr(msg, kind)})


def chat_messages(msg: pb.ChatMessages) -> list[dict[str, str]]:
    if not msg.messages:
        raise ValueError("chat.messages=[] is invalid: must hold at least one message")
    out = []
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise ValueError(f"chat.messages[{i}].role='' is invalid: must be non-empty")
        out.append({"role": m.role, "content": m.content})
    return out


def render_chat(tokenizer: Any, msg: pb.ChatMessages) -> list[int]:
    messages = chat_messages(msg)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError:
        raise
    except Exception as exc:  # jinja raise_exception etc.
        raise ValueError(f"chat.messages is invalid: the chat template failed: {exc}") from exc
    return [int(t) for t in ids]


def check_token_ids(field: str, ids, vocab_size: int | None) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError(f"{field}=[] is invalid: must contain at least 1 token")
    hi = vocab_size
    for t in ids:
        if t < 0 or (hi is not None and t >= hi):
            raise ValueError(f"{field} contains {t}, which is invalid: token ids must be in "
                             f"[0, {hi if hi is not None else 'vocab_size'})")
    return ids


def prompt_from_request(req: pb.GenerateRequest, tokenizer: Any, vocab_size: int | None):
    """Return what ``engine.add_request`` takes: a str or {"prompt_token_ids": [...]}."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is invalid: set one of text, chat or token_ids")
    if kind == "text":
        if req.text == "":
            raise ValueError("text='' is invalid: the prompt must be non-empty")
        return req.text
    if kind == "chat":
        return {"prompt_token_ids": render_chat(tokenizer, req.chat)}
    return {"prompt_token_ids": check_token_ids("token_ids", req.token_ids.ids, vocab_size)}


# ----- outputs -> deltas -------------------------------------------------------------------
class _Sent:
    __slots__ = ("tokens", "text_len", "finished")

    def __init__(self):
        self.tokens = 0
        self.text_len = 0
        self.finished = False


class DeltaTracker:
    """Turns the engine's cumulative outputs into GenerateResponse deltas.

    Several outputs may arrive between two sends (coalesced: only the newest per sample index
    counts). While a sample runs with stop strings, the last ``max(len(stop)) - 1`` characters
    are held back, so text the engine later cuts at a stop string is never sent: the
    concatenated text deltas always equal the final text.
    """

    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1
        self.latest: dict[int, Any] = {}
        self.sent: dict[int, _Sent] = {}
        self.finished = False
        self._prompt_sent = False
        self._prompt_logprobs_sent = False
        self._last = None

    def update(self, batch: list) -> pb.GenerateResponse | None:
        for out in batch:
            self._last = out
            for c in out.outputs:
                self.latest[c.index] = c
            if out.finished:
                self.finished = True
        out = self._last
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
                        item.logprobs.add(token_id=int(tid), logprob=_f(lp.logprob))
            self._prompt_logprobs_sent = True
        for idx in sorted(self.latest):
            delta = self._delta(idx, self.latest[idx])
            if delta is not None:
                resp.outputs.append(delta)
        if self.finished:
            resp.usage.prompt_tokens = len(out.prompt_token_ids)
            resp.usage.completion_tokens = sum(len(c.token_ids) for c in self.latest.values())
            resp.usage.cached_tokens = int(getattr(out, "num_cached_tokens", 0) or 0)
        if not resp.outputs and not self.finished and not resp.prompt_token_ids:
            return None
        return resp

    def _delta(self, idx: int, c: Any) -> pb.CompletionDelta | None:
        sent = self.sent.setdefault(idx, _Sent())
        done = c.finish_reason is not None
        token_ids = c.token_ids
        n_tok = len(token_ids)
        text = c.text
        upto = len(text) if (done or self.hold == 0) else max(sent.text_len, len(text) - self.hold)
        new_tokens = token_ids[sent.tokens:n_tok]
        new_text = text[sent.text_len:upto]
        if not new_tokens and not new_text and not (done and not sent.finished):
            return None
        if done and len(text) < sent.text_len:
            log.warning("request %s sample %d: final text is shorter than the text already "
                        "streamed (%d < %d chars)", self.request_id, idx, len(text), sent.text_len)
        d = pb.CompletionDelta(index=idx, token_ids=new_tokens, text=new_text)
        if c.logprobs is not None:
            for j in range(sent.tokens, min(n_tok, len(c.logprobs))):
                entry = c.logprobs[j] or {}  # {token_id: jaxllm.Logprob}
                tid = token_ids[j]
                own = entry.get(tid)
                tl = d.logprobs.add(token_id=int(tid), logprob=_f(own.logprob if own is not None else float("nan")))
                for k, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
                    tl.top_logprobs.add(token_id=int(k), logprob=_f(lp.logprob))
        if c.cumulative_logprob is not None:
            d.cumulative_logprob = _f(c.cumulative_logprob)
        if done and not sent.finished:
            d.finish_reason = FINISH_REASONS.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
            sr = c.stop_reason
            if isinstance(sr, str):
                d.stop_string = sr
            elif isinstance(sr, int) and not isinstance(sr, bool):
                d.stop_token_id = sr
            sent.finished = True
        sent.tokens = n_tok
        sent.text_len = max(sent.text_len, upto)
        return d


def _f(x) -> float:
    return float(x)
