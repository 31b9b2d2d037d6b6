"""/v1/completions ``echo`` and vLLM's ``prompt_logprobs`` for the HTTP API (no jax).

- ``echo=true``: each choice's ``text`` is the prompt text (a token-id prompt: its decoded text)
  then the completion. With ``logprobs=k`` the engine is asked for the prompt's logprobs too
  (``prompt_logprobs = max(k, prompt_logprobs)``) and the legacy logprobs object covers the
  prompt tokens first (the first one has no logprob: ``null`` in ``token_logprobs`` and
  ``top_logprobs``), then the generated ones, ``text_offset`` running on across both. A stream
  sends the prompt in each choice's first chunk.
- ``max_tokens=0`` with ``echo`` scores the prompt, as vLLM and OpenAI allow: the engine, whose
  requests generate at least one token, runs ``max_tokens=1`` and that token is dropped: the
  answer holds only the prompt, ``finish_reason`` ``length``, ``completion_tokens`` 0.
- ``echo=true`` on chat (vLLM's extra field): the answer's content starts with the last message's
  content when that message is the assistant's (the role of the answer: this server always adds
  the generation prompt), so a client that prefilled the reply gets it whole; no logprobs for it.
- ``prompt_logprobs=k`` (both endpoints): vLLM's list, ``null`` for the first prompt token, then
  per token ``{token id: {"logprob", "rank", "decoded_token"}}`` (the prompt token and the top k);
  on each choice for completions, on the response for chat, as vLLM places it. Like vLLM, it is
  refused with ``stream=true`` (``prompt_logprobs=0`` excepted).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from serving.deltas import SampleDelta

# vLLM's clamp for a -inf logprob in JSON (clamp_prompt_logprobs)
MIN_LOGPROB = -9999.0


def echo_sampling_kwargs(kw: dict[str, Any], *, echo: bool) -> dict[str, Any]:
    """The SamplingParams fields of a completions body with ``echo`` applied (see the module doc);
    ValueError names the field, the value and the limit."""
    kw = dict(kw)
    if kw.get("max_tokens") == 0:
        if not echo:
            raise ValueError("max_tokens=0 is invalid: must be >= 1 (0 only with echo=true, to score the prompt)")
        if kw.get("min_tokens"):
            raise ValueError(f"min_tokens={kw['min_tokens']} is invalid: must be <= max_tokens=0")
        kw["max_tokens"] = 1  # generated, then dropped from the answer
    k, pk = kw.get("logprobs"), kw.get("prompt_logprobs")
    if echo and k is not None and k >= 0 and (pk is None or pk >= 0):  # bad values stay for validation
        kw["prompt_logprobs"] = max(k, pk or 0)
    return kw


def check_stream(prompt_logprobs: int | None, stream: bool) -> str | None:
    """The refusal message for prompt logprobs asked of a stream (vLLM's rule), else None."""
    if stream and prompt_logprobs:
        return (f"prompt_logprobs={prompt_logprobs} is invalid with stream=true: prompt logprobs "
                f"come only in a non-streamed answer")
    return None


def echo_text(prompt: Any, tokenizer: Any) -> str:
    """The text a choice echoes: a str prompt as sent; token ids decoded as vLLM does (special
    tokens kept)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt.get("prompt"), str):  # text tokenized by the door (add_special_tokens=false)
        return prompt["prompt"]
    return tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False)


class Echo:
    """What a job puts before each choice: per prompt position, its text (completions: the prompt;
    chat: the last assistant message); whether the answer is the prompt alone (``max_tokens=0``)."""

    def __init__(self, texts: list[str], prompt_only: bool, with_logprobs: bool = True):
        self.texts = texts
        self.prompt_only = prompt_only
        self.with_logprobs = with_logprobs  # the prompt tokens' rows lead the legacy logprobs

    def delta(self, k: int, d: SampleDelta, *, first: bool, out: Any, logprobs: bool) -> SampleDelta:
        """``d`` (a choice of prompt ``k``; ``out`` its newest RequestOutput) with the prompt
        before it when it is the choice's first delta; with ``max_tokens=0`` the generated token
        is dropped and the choice ends as ``length``."""
        if self.prompt_only:
            finish = "length" if d.finish_reason in ("stop", "length") else d.finish_reason  # its 1 token ended it
            d = SampleDelta(d.index, [], "")
            d.logprobs = [] if logprobs else None
            d.finish_reason = finish
        if first:
            d.text = self.texts[k] + d.text
            if d.logprobs is not None and self.with_logprobs:
                d.logprobs = self.rows(out) + d.logprobs
        return d

    def rows(self, out: Any) -> list[tuple[int, float | None, dict | None]]:
        """Legacy-logprobs rows ``(token id, its logprob or None, {id: Logprob} or None)`` of a
        RequestOutput's prompt tokens: the first (and any position without logprobs) None."""
        plp = out.prompt_logprobs or []
        rows = []
        for pos, tid in enumerate(out.prompt_token_ids):
            entry = plp[pos] if pos < len(plp) else None
            own = entry.get(tid) if entry else None
            rows.append((int(tid), float(own.logprob) if own is not None else None, entry if own is not None else None))
        return rows


def answer_role(body: Any, response_role: str = "assistant") -> str:
    """A chat answer's role (vLLM's rule): ``response_role`` (--response-role) when the template adds
    the generation prompt, else the last message's own role (the answer continues it)."""
    if getattr(body, "add_generation_prompt", True) or not body.messages:
        return response_role
    return body.messages[-1].to_dict()["role"]


def chat_echo(body: Any, response_role: str = "assistant") -> Echo | None:
    """A chat body's echo (vLLM's ``echo``): the last message's text when its role is the answer's
    (``answer_role``); None when there is nothing to echo."""
    if not getattr(body, "echo", False) or not body.messages:
        return None
    last = body.messages[-1].to_dict()
    if last["role"] != answer_role(body, response_role) or not last["content"]:
        return None
    return Echo([last["content"]], prompt_only=False, with_logprobs=False)


def prompt_logprobs_json(out: Any, k: int, token_text: Callable[[int, Any], str]) -> list | None:
    """vLLM's ``prompt_logprobs`` list from a RequestOutput's: None where a position has none (the
    first); else the prompt token and the alternatives ranked <= k (the engine may have computed
    more for echo's logprobs), keyed by token id, -inf clamped to -9999.0 as vLLM does."""
    plp = out.prompt_logprobs
    if plp is None:
        return None
    res: list = []
    for tid, entry in zip(out.prompt_token_ids, plp):
        if not entry:
            res.append(None)
            continue
        keep = [(t, lp) for t, lp in entry.items() if t == tid or lp.rank is None or lp.rank <= k]
        res.append({str(int(t)): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                  "decoded_token": token_text(int(t), lp)} for t, lp in keep})
    return res


def _clamp(v: float) -> float | None:
    v = float(v)
    if math.isnan(v):
        return None
    return max(v, MIN_LOGPROB)
