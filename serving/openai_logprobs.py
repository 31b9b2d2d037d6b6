"""OpenAI's logprobs objects from a choice's delta (no jax): the legacy completions object (tokens,
token_logprobs, top_logprobs, text_offset) and the chat object (content: token, logprob, bytes,
top_logprobs). ``job`` is serving/openai_generate.py's request job: its ``params.logprobs`` (k),
``token_text`` and per-choice ``offsets``.
"""

from __future__ import annotations

import math
from typing import Any

from serving.deltas import SampleDelta

def completion_logprobs(job, index: int, d: SampleDelta) -> dict | None:
    """The legacy logprobs object of a delta; an echoed prompt token without logprobs (the first)
    has ``null`` entries. ``top_logprobs`` per token: the token itself and the top k (so k or
    k + 1 entries; ``logprobs=0`` gives the token alone), as vLLM. ``text_offset`` runs on across
    a choice's deltas."""
    if d.logprobs is None:
        return None
    k = job.params.logprobs or 0
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = job.offsets.get(index, 0)
    for tid, own, entry in d.logprobs:
        text = job.logprob_token(tid, entry.get(tid) if entry is not None else None)
        tokens.append(text)
        token_lps.append(own)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            tops.append(None)
            continue
        # vLLM's rule (the OpenAI API's): the chosen token first, then the top k (k = 0: the chosen one alone)
        best = [(tid, entry[tid])] if tid in entry else []
        best += [kv for kv in sorted(entry.items(), key=_by_rank)[:k] if kv[0] != tid]
        tops.append({job.logprob_token(t, lp): lp.logprob for t, lp in best})
    job.offsets[index] = offset
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _by_rank(kv: tuple[int, Any]) -> tuple[float, float]:
    """Sort key of a logprobs entry's items: the engine's rank (the top k are ranks 1..k), then
    the logprob (a rank may be missing)."""
    rank = kv[1].rank
    return (rank if rank is not None else math.inf, -kv[1].logprob)


def chat_logprobs(job, d: SampleDelta) -> dict | None:
    if d.logprobs is None:
        return None
    k = job.params.logprobs or 0
    content = []
    for tid, own, entry in d.logprobs:
        text = job.logprob_token(tid, entry.get(tid))
        best = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
        tops = [{"token": (t := job.logprob_token(i, lp)), "logprob": lp.logprob, "bytes": list(t.encode())}
                for i, lp in best]
        content.append({"token": text, "logprob": own, "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": content}
