"""The narrow interface between the host engine and the (jitted) model runner.

The engine never imports jax; it talks to any object with this shape. Contract:

- ``num_blocks``: KV blocks the runner allocated (block 0 is an ordinary block, not reserved).
  The engine's KV cache manager hands out exactly ``0 .. num_blocks-1``.
- ``execute(out)``: for every ``ScheduledSeq``, write the KV of ``token_ids`` (positions
  ``start_pos ..``) into the slots given by its block table, attend over positions
  ``0 .. start_pos + len(token_ids) - 1``, and for seqs with ``sample=True`` sample one token
  from the logits of the last position. Blocks can be shared between seqs of the same step
  (prefix caching, n > 1), so a step's cache writes must land before that layer's attention
  reads the cache. Return ``{request_id: SampledToken}`` for exactly the ``sample=True`` seqs.
  Sampling must be reproducible per request: the key for the token at position ``p`` derives
  from ``(seed, p)`` only, whatever else is in the batch. While the request has fewer than
  ``params.min_tokens`` generated tokens (``start_pos + len(token_ids) - num_prompt_tokens``),
  mask EOS (unless ``params.ignore_eos``) and ``params.stop_token_ids``.
- ``take_prompt_logprobs()`` (optional; with ``supports_prompt_logprobs``): for seqs whose params
  ask ``prompt_logprobs``, ``{request_id: {prompt position: SampledToken}}`` computed since the last
  call, where the SampledToken is the prompt token at that position (its raw logprob and rank)
  with the top ``prompt_logprobs`` alternatives.
- ``release(ids)`` / ``out.finished_or_preempted_ids``: forget per-request device state
  (penalty counts, ...). Unknown ids are a no-op; a preempted request comes back later with
  ``start_pos == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from jaxllm.core.scheduler_output import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # logprob of the sampled token under the raw model distribution (vLLM default)
    top_logprobs: list[tuple[int, float]] | None = None  # top-k (k = params.logprobs) when asked, best first:
    # the i-th has rank i + 1
    rank: int | None = None  # 1-based rank of token_id in the raw distribution (1 + #logits strictly greater)


@runtime_checkable
class ModelRunnerProtocol(Protocol):
    vocab_size: int
    num_blocks: int

    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]: ...

    def release(self, request_ids: list[str]) -> None: ...
