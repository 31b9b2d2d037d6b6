"""Host side of embedding requests: accumulate each chunk's pooled hidden states, finish (numpy).

The runner returns, for every scheduled seq of an embed step, ``PooledChunk(sum, last)``: the f32
sum of the chunk's hidden states (last_hidden_state, after the final norm) and the chunk's last
token's. A prompt longer than the token budget arrives in several chunks (chunked prefill): MEAN
needs the sum over all of them, LAST the final chunk's last token. A request preempted and
recomputed starts again at position 0, which resets the sum.

A classify engine's runner returns ``PooledChunk(logits=...)`` instead: the classifier head's logits
of the chunk's last token; the final chunk's are the prompt's, activated here (``activate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.core.request import Request
from jaxllm.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                            EmbeddingRequestOutput, RequestMetrics)


@dataclass
class PooledChunk:
    sum: np.ndarray | None  # [E] f32, sum of the chunk's hidden states (None: a classify step)
    last: np.ndarray | None  # [E] f32, hidden state of the chunk's last token (None: a classify step)
    logits: np.ndarray | None = None  # [num_labels] f32: the classifier head's, last token


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """vLLM's classifier activations over the labels of [..., L] logits: "softmax", "sigmoid" or
    "identity" (jaxllm/models/classifier_config.py picks the model's). f32 in, f64 out."""
    x = np.asarray(logits, dtype=np.float64)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow
    if activation == "identity":
        return x
    raise ValueError(f"activation={activation!r} is invalid: must be one of ['softmax', 'sigmoid', 'identity']")


def pool(total: np.ndarray, last: np.ndarray, num_tokens: int, pooling_type: str, normalize: bool,
         dimensions: int | None = None) -> np.ndarray:
    """The embedding of a prompt from its summed and last hidden states ([E] f32 each): [E] f32, or
    [dimensions] (Matryoshka: the first values, normalised after the cut, as vLLM)."""
    v = last if pooling_type == "LAST" else total / num_tokens
    v = v.astype(np.float32)[:dimensions]
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)  # like torch.nn.functional.normalize
    return v


class EmbedState:
    """One embedding request in the engine: its scheduler Request and the running sums."""

    def __init__(self, req: Request, prompt: str | None, arrival_time: float,
                 activation: str | None = None) -> None:
        """``activation``: a classify request's ("softmax" / "sigmoid" / "identity"); None = an embedding."""
        self.req = req
        self.activation = activation
        self.prompt = prompt
        self.arrival_time = arrival_time
        self.sum: np.ndarray | None = None  # [E] f64
        self.num_pooled = 0
        self.in_stats = True  # False: left out of the request-level stats (engine.exclude_from_stats)

    def add(self, start_pos: int, num_tokens: int, chunk: PooledChunk) -> bool:
        """File one computed chunk; True when it was the prompt's last."""
        if start_pos == 0:  # first chunk, or recomputed after preemption
            self.sum, self.num_pooled = None, 0
        if chunk.sum is not None:
            s = chunk.sum.astype(np.float64)
            self.sum = s if self.sum is None else self.sum + s
        self.num_pooled += num_tokens
        self.last = chunk.last
        self.logits = chunk.logits
        return start_pos + num_tokens == self.req.num_prompt_tokens

    def output(self, now: float) -> EmbeddingRequestOutput | ClassificationRequestOutput:
        p = self.req.pooling
        assert self.num_pooled == self.req.num_prompt_tokens, (self.num_pooled, self.req.num_prompt_tokens)
        metrics = RequestMetrics(arrival_time=self.arrival_time, first_scheduled_time=self.req.first_scheduled_time,
                                 first_token_time=now, finished_time=now)
        if self.activation is not None:
            probs = activate(self.logits, self.activation if p.activation is not False else "identity")
            return ClassificationRequestOutput(
                request_id=self.req.request_id, outputs=ClassificationOutput(probs=probs.tolist()),
                prompt_token_ids=list(self.req.prompt_token_ids), prompt=self.prompt, metrics=metrics)
        vec = pool(self.sum, self.last, self.num_pooled, p.pooling_type, p.normalize, p.dimensions)
        return EmbeddingRequestOutput(request_id=self.req.request_id, outputs=EmbeddingOutput(embedding=vec.tolist()),
                                      prompt_token_ids=list(self.req.prompt_token_ids), prompt=self.prompt,
                                      metrics=metrics)
