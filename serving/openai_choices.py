"""The choices of a /v1/completions or /v1/chat/completions answer (no jax): the non-streamed body
(``final_body``) and a stream chunk (``stream_chunk``) from a job's trackers (serving/openai_generate.py's
``_Job``: its kind, params, echo, tool and reasoning plans). Choice ``index`` = prompt position * n +
sample index. The chat shaping (``chat_choice``) is shared with the Responses door.
"""

from __future__ import annotations

from typing import Any

from serving.deltas import DeltaTracker, SampleDelta
from serving.openai_echo import prompt_logprobs_json
from serving.openai_logprobs import chat_logprobs, completion_logprobs


def final_body(job: Any) -> dict:
    n = job.params.n
    choices = []
    for k, tracker in enumerate(job.trackers):
        for idx in sorted(tracker.latest):
            d = final_delta(idx, tracker.latest[idx])
            choice = _choice(job, k * n + idx, _echoed(job, k, d, first=True), final=True)
            if job.kind == "completion":  # vLLM: on each completion choice
                choice["prompt_logprobs"] = _prompt_logprobs(job, tracker)
            choices.append(choice)
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    out = {"id": job.id, "object": obj, "created": job.created, "model": job.info.name,
           "choices": choices, "usage": job.usage()}
    if job.kind == "chat":  # vLLM: on the chat response
        out["prompt_logprobs"] = _prompt_logprobs(job, job.trackers[0])
    return out


def final_delta(idx: int, c: Any) -> SampleDelta:
    """Sample ``idx``'s whole output ``c`` (a CompletionOutput) as one delta, logprobs included."""
    d = SampleDelta(idx, list(c.token_ids), c.text)
    if c.logprobs is not None:
        d.logprobs = []
        for t, entry in zip(c.token_ids, c.logprobs):
            entry = entry or {}
            own = entry.get(t)
            d.logprobs.append((int(t), float(own.logprob) if own is not None else float("nan"), entry))
    d.finish_reason, d.stop_reason = c.finish_reason, c.stop_reason
    return d


def _prompt_logprobs(job: Any, tracker: DeltaTracker) -> list | None:
    if job.prompt_logprobs is None or tracker.last is None:
        return None
    return prompt_logprobs_json(tracker.last, job.prompt_logprobs, job.token_text)


def _echoed(job: Any, k: int, d: SampleDelta, *, first: bool) -> SampleDelta:
    if job.echo is None:
        return d
    return job.echo.delta(k, d, first=first, out=job.trackers[k].last, logprobs=job.params.logprobs is not None)


def _choice(job: Any, index: int, d: SampleDelta, *, final: bool, first: bool = False) -> dict | None:
    stop_reason = d.stop_reason if isinstance(d.stop_reason, (str, int)) else None
    if job.kind == "completion":
        out = {"index": index, "text": d.text, "logprobs": completion_logprobs(job, index, d),
               "finish_reason": d.finish_reason}
    else:
        out = chat_choice(job, index, d, final=final, first=first)
        if out is None:
            return None
    out["stop_reason"] = stop_reason
    return out


def chat_choice(job: Any, index: int, d: SampleDelta, *, final: bool, first: bool) -> dict | None:
    """A chat choice: the reasoning parser (if any) takes the think block out of the text, the tool
    reader (if any) reads the rest; None while both hold the text back."""
    lp = chat_logprobs(job, d)
    rp, tools = job.reasoning, job.tools
    if final:
        reasoning, text = rp.split(d.text) if rp is not None else (None, d.text)
        if tools is not None:  # tool calls: the content read by its tool reader
            msg, reason = tools.message(text, d.finish_reason)
        else:
            msg = {"role": "assistant", "content": text if rp is None else text or None,
                   "tool_calls": []}  # as vLLM's ChatMessage dumps it
            reason = d.finish_reason
        if rp is not None:
            msg = _with_reasoning(msg, reasoning)
        return {"index": index, "message": msg, "logprobs": lp, "finish_reason": reason}
    reasoning, text = rp.delta(index, d.text, d.finish_reason is not None) if rp is not None else ("", d.text)
    if tools is not None:
        delta, reason = tools.delta(index, text, d.finish_reason, first)
    elif rp is not None:
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        reason = d.finish_reason
    else:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        reason = d.finish_reason
    if reasoning:
        delta = _with_reasoning(delta, reasoning)
    if not delta and lp is None and reason is None:
        return None  # text held back by the parser or the reader: nothing to send for this choice yet
    return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}


def _with_reasoning(msg: dict, reasoning: str | None) -> dict:
    """``msg`` with ``reasoning`` after ``role`` (vLLM's field order)."""
    out = {"role": msg["role"]} if "role" in msg else {}
    out["reasoning"] = reasoning
    out.update((k, v) for k, v in msg.items() if k != "role")
    return out



def stream_chunk(job: Any, head: dict, k: int, batch: list, started: set[int]) -> dict | None:
    """The chunk of prompt ``k``'s new outputs ``batch`` (None when every choice holds its text back);
    ``started``: the choice indices already sent (their first delta carried the role / the echo)."""
    choices = []
    for d in job.trackers[k].update(batch):
        index = k * job.params.n + d.index
        first = index not in started
        choice = _choice(job, index, _echoed(job, k, d, first=first), final=False, first=first)
        if choice is not None:
            choices.append(choice)
            started.add(index)
    if not choices:
        return None
    chunk = dict(head, choices=choices)
    if job.include_usage:  # vLLM's continuous_usage_stats: the tokens so far, else null until the last chunk
        chunk["usage"] = job.usage() if job.continuous_usage else None
    return chunk
