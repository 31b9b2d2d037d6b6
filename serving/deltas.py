"""Cumulative engine outputs -> per-sample deltas, for any transport (no jax, no wire format).

The engine hands back cumulative ``RequestOutput``s; a streaming door sends only what is new.
Several outputs may arrive between two sends (coalesced: only the newest per sample index
counts). While a sample runs with stop strings, the last ``max(len(stop)) - 1`` characters are
held back, so text the engine later cuts at a stop string is never sent: the concatenated text
deltas always equal the final text.
"""

from __future__ import annotations

import logging
from typing import Any

from jaxllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class SampleDelta:
    """What one sample gained since the last update. ``logprobs``: one ``(token_id, logprob,
    {token_id: Logprob})`` per new token (the sampled token's own logprob, then the top-k entry)."""

    __slots__ = ("index", "token_ids", "text", "logprobs", "cumulative_logprob", "finish_reason",
                 "stop_reason")

    def __init__(self, index: int, token_ids: list[int], text: str):
        self.index = index
        self.token_ids = token_ids
        self.text = text
        self.logprobs: list[tuple[int, float, dict]] | None = None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None  # set once, on the sample's last delta
        self.stop_reason: int | str | None = None


class _Sent:
    __slots__ = ("tokens", "text_len", "finished")

    def __init__(self):
        self.tokens = 0
        self.text_len = 0
        self.finished = False


class DeltaTracker:
    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1
        self.latest: dict[int, Any] = {}  # sample index -> newest CompletionOutput
        self.sent: dict[int, _Sent] = {}
        self.finished = False
        self.last = None  # newest RequestOutput

    def update(self, batch: list) -> list[SampleDelta]:
        for out in batch:
            self.last = out
            for c in out.outputs:
                self.latest[c.index] = c
            if out.finished:
                self.finished = True
        if self.last is None:
            return []
        return [d for idx in sorted(self.latest) if (d := self._delta(idx, self.latest[idx])) is not None]

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self.last.prompt_token_ids) if self.last is not None else []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.last.prompt_token_ids) if self.last is not None else 0

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.latest.values())

    @property
    def num_cached_tokens(self) -> int:
        return int(getattr(self.last, "num_cached_tokens", 0) or 0) if self.last is not None else 0

    def _delta(self, idx: int, c: Any) -> SampleDelta | None:
        sent = self.sent.setdefault(idx, _Sent())
        done = c.finish_reason is not None
        token_ids = c.token_ids
        n_tok = len(token_ids)
        text = c.text
        upto = len(text) if (done or self.hold == 0) else max(sent.text_len, len(text) - self.hold)
        new_tokens = list(token_ids[sent.tokens:n_tok])
        new_text = text[sent.text_len:upto]
        if not new_tokens and not new_text and not (done and not sent.finished):
            return None
        if done and len(text) < sent.text_len:
            log.warning("request %s sample %d: final text is shorter than the text already "
                        "streamed (%d < %d chars)", self.request_id, idx, len(text), sent.text_len)
        d = SampleDelta(idx, new_tokens, new_text)
        if c.logprobs is not None:
            d.logprobs = []
            for j in range(sent.tokens, min(n_tok, len(c.logprobs))):
                entry = c.logprobs[j] or {}  # {token_id: jaxllm.Logprob}
                tid = token_ids[j]
                own = entry.get(tid)
                d.logprobs.append((int(tid), float(own.logprob) if own is not None else float("nan"), entry))
        if c.cumulative_logprob is not None:
            d.cumulative_logprob = float(c.cumulative_logprob)
        if done and not sent.finished:
            d.finish_reason = c.finish_reason
            d.stop_reason = c.stop_reason
            sent.finished = True
        sent.tokens = n_tok
        sent.text_len = max(sent.text_len, upto)
        return d
