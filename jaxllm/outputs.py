"""Request outputs (host side). msgspec Structs so JSONL out goes through msgspec.json.

Outputs are cumulative: every ``RequestOutput`` a step returns carries the whole text and
token ids generated so far (stream-friendly: a client diffs against what it has shown);
``finished`` is True exactly once, on the last one.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]

# One entry per generated token: {token_id: logprob} holding the sampled token and the top-k.
Logprobs = list[dict[int, float]]
# One entry per prompt token; the first is None (nothing predicts it).
PromptLogprobs = list[dict[int, float] | None]


class CompletionOutput(msgspec.Struct, kw_only=True):
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    # the stop token id or stop string that ended the request (None for EOS / length / abort)
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestMetrics(msgspec.Struct, kw_only=True):
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


class RequestOutput(msgspec.Struct, kw_only=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
