"""Request outputs (host side). msgspec Structs so JSONL out goes through msgspec.json.

Outputs are cumulative: every ``RequestOutput`` a step returns carries the whole text and
token ids generated so far (stream-friendly: a client diffs against what it has shown);
``finished`` is True exactly once, on the last one.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]


class Logprob(msgspec.Struct):
    """vLLM's ``Logprob``: one token's entry in a logprobs dict.

    ``logprob``: under the raw model distribution (log_softmax of the unprocessed logits).
    ``rank``: 1-based rank of the token in that whole distribution (1 + the number of tokens with a
    strictly greater logit), also for a sampled or prompt token outside the top-k.
    ``decoded_token``: the token's text alone, ``tokenizer.decode([id], skip_special_tokens=False)``
    as vLLM shows it; None when the request has ``detokenize=False``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per generated token: {token_id: Logprob} holding the sampled token and the top-k.
Logprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


def flat_logprobs(entries):
    """Logprobs or PromptLogprobs as plain ``{token_id: logprob}`` dicts (None stays None): the
    shape the JSONL output and the gRPC messages carry."""
    if entries is None:
        return None
    return [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in entries]


def output_json(out: "RequestOutput") -> bytes:
    """One JSONL line for ``out`` with logprobs as ``{"token_id": logprob}`` (the ``--output``
    format, unchanged by the ``Logprob`` objects; rank and text are not written)."""
    outs = [msgspec.structs.replace(c, logprobs=flat_logprobs(c.logprobs)) for c in out.outputs]
    return msgspec.json.encode(msgspec.structs.replace(out, outputs=outs,
                                                       prompt_logprobs=flat_logprobs(out.prompt_logprobs)))


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


class EmbeddingOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``EmbeddingOutput``: the pooled (and, by default, L2-normalised) vector."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


class EmbeddingRequestOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``EmbeddingRequestOutput``: one embedding request's result (always final: an
    embedding request finishes in the step that computes its prompt's last chunk)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    prompt: str | None = None
    finished: bool = True
    metrics: RequestMetrics | None = None


class ClassificationOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``ClassificationOutput``: the classifier head's logits after the model's activation
    (softmax over the labels, sigmoid for one label or a multi-label model, none for regression;
    raw logits with ``PoolingParams(activation=False)``)."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


class ClassificationRequestOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``ClassificationRequestOutput`` (``LLM.classify``): always final, like an embedding's."""

    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    prompt: str | None = None
    finished: bool = True
    metrics: RequestMetrics | None = None


class ScoringOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``ScoringOutput``: a cross-encoder's activated logit of a text pair, or the cosine of an
    embedding model's two vectors."""

    score: float


class ScoringRequestOutput(msgspec.Struct, kw_only=True):
    """vLLM's ``ScoringRequestOutput`` (``LLM.score``): one pair's score; ``prompt_token_ids`` the pair
    encoding (a cross-encoder) or both texts' tokens (an embedding model)."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
