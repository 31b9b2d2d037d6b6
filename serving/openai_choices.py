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
            d = _echoed(job, k, final_delta(idx, tracker.latest[idx]), first=True)
            choice = _choice(job, k * n + idx, d, final=True)
            if job.kind == "completion":  # vLLM: on each completion choice
                choice["prompt_logprobs"] = _prompt_logprobs(job, tracker)
            _with_token_ids(job, choice, tracker, d, first=True)
            choices.append(choice)
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    out = {"id": job.id, "object": obj, "created": job.created, "model": job.info.name,
           "choices": choices, "usage": job.usage()}
    if job.kind == "chat":  # vLLM: on the chat response (null without return_token_ids, as its model_dump)
        out["prompt_logprobs"] = _prompt_logprobs(job, job.trackers[0])
        out["prompt_token_ids"] = job.trackers[0].prompt_token_ids if job.return_token_ids else None
    return out


def _with_token_ids(job: Any, choice: dict, tracker: DeltaTracker, d: SampleDelta, *, first: bool) -> None:
    """vLLM's ``return_token_ids`` on a choice: ``token_ids`` (the sample's generated ids; in a stream
    this chunk's), and for completions ``prompt_token_ids`` (its prompt's, on a choice's first chunk; chat
    puts them on the response / the chunk). Chat under a reasoning parser with ``include_reasoning=false``
    leaves them out (null), as vLLM: they would show the hidden reasoning. Without ``return_token_ids`` the
    keys are there as null, streamed or not: vLLM's answers always carry them (its non-streamed bodies are
    whole ``model_dump``s, its chunks set both on every choice)."""
    if not job.return_token_ids:
        if job.kind == "completion":
            choice["prompt_token_ids"] = None
        choice["token_ids"] = None
        return
    if job.kind == "completion":
        choice["prompt_token_ids"] = tracker.prompt_token_ids if first else None
    hidden = job.reasoning is not None and not job.reasoning.include
    choice["token_ids"] = None if hidden else [int(t) for t in d.token_ids]


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
            msg = {"role": job.role, "content": text if rp is None else text or None,
                   "tool_calls": []}  # as vLLM's ChatMessage dumps it
            reason = d.finish_reason
        msg["role"] = job.role  # (the tool reader's message too)
        if rp is not None:
            msg = _with_reasoning(msg, reasoning)
        return {"index": index, "message": msg, "logprobs": lp, "finish_reason": reason}
    reasoning, text = rp.delta(index, d.text, d.finish_reason is not None) if rp is not None else ("", d.text)
    if tools is not None:
        delta, reason = tools.delta(index, text, d.finish_reason, first)
        if "role" in delta:
            delta["role"] = job.role
    elif rp is not None:
        delta = {"role": job.role} if first else {}
        if text:
            delta["content"] = text
        reason = d.finish_reason
    else:
        delta = {"role": job.role, "content": text} if first else {"content": text}
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


def stream_chunks(job: Any, head: dict, k: int, batch: list, started: set[int]) -> list[dict]:
    """The chunks of prompt ``k``'s new outputs ``batch`` (none while every choice holds its text back);
    ``started``: the choice indices already sent (their first delta carried the role / the echo). One
    chunk for them all, or one per choice under ``continuous_usage_stats``: each chunk's usage is then
    its own choice's tokens so far, with its prompt's (vLLM's count)."""
    tracker = job.trackers[k]
    choices, firsts = [], []
    for d in tracker.update(batch):
        index = k * job.params.n + d.index
        first = index not in started
        d = _echoed(job, k, d, first=first)
        choice = _choice(job, index, d, final=False, first=first)
        if choice is None and job.return_token_ids and d.token_ids:  # vLLM: every token's id is sent
            choice = {"index": index, "delta": {"role": job.role} if first else {}, "logprobs": None,
                      "finish_reason": None, "stop_reason": None}
        if choice is not None:
            _with_token_ids(job, choice, tracker, d, first=first)
            choices.append(choice)
            firsts.append(first)
            started.add(index)
    groups = [([c], [f]) for c, f in zip(choices, firsts)] if job.continuous_usage else [(choices, firsts)]
    chunks = []
    for group, group_firsts in groups:
        if not group:
            continue
        chunk = dict(head, choices=group)
        if job.kind == "chat" and any(group_firsts):  # vLLM: with each choice's first delta (null when unasked)
            chunk["prompt_token_ids"] = tracker.prompt_token_ids if job.return_token_ids else None
        if job.include_usage:  # vLLM's continuous_usage_stats: the tokens so far, else null until the last chunk
            chunk["usage"] = job.usage(only=(k, group[0]["index"] - k * job.params.n)) if job.continuous_usage \
                else None
        chunks.append(chunk)
    return chunks
