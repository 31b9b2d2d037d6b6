"""What the scheduler hands the model runner for one step (host only, no jax)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxllm.sampling_params import SamplingParams

PLACEHOLDER_TOKEN_ID = -1  # a token the host does not know yet (async scheduling)


@dataclass
class ScheduledSeq:
    request_id: str
    # the new tokens fed this step: all_token_ids[start_pos : start_pos + len(token_ids)]
    token_ids: list[int]
    # num_computed_tokens before this step (the position of token_ids[0])
    start_pos: int
    # the request's whole block table after this step's allocation; token at position p lives in
    # slot block_ids[p // block_size] * block_size + p % block_size. From the scheduler: a read-only int32
    # numpy array that never changes (KVCacheManager.block_table); a list of ints is accepted as well
    block_ids: np.ndarray | list[int]
    # True iff after this step every known token is computed -> sample 1 new token
    sample: bool
    # original prompt length: positions >= this hold generated tokens (for penalties)
    num_prompt_tokens: int
    params: SamplingParams
    # effective per-request seed: params.seed, or drawn from the engine's RNG at add time
    # (n > 1 children: derived per index). The key of the token sampled this step derives from
    # (seed, start_pos + len(token_ids)) only -- the position the new token will take.
    seed: int
    # Not None iff this is the request's first step since it was admitted (new, or resumed after
    # preemption): the tokens before start_pos (a prefix-cache hit) that the runner has never
    # seen. Per-request runner state (penalty counts over prompt/output tokens) starts from
    # prefix_token_ids + token_ids; ``[]`` when start_pos == 0.
    prefix_token_ids: list[int] | None = None
    # The known token right after this step's chunk (the next prompt token of a chunked prefill),
    # None when the chunk ends at the last known token. Prompt logprobs of the chunk's last
    # position need it.
    next_token_id: int | None = None
    # Async scheduling: True iff token_ids == [PLACEHOLDER_TOKEN_ID], the token this request sampled
    # in the previous step, which is still on the device. The runner feeds that sampled token (it
    # never comes back to the host first); it counts for penalties like any fed token.
    placeholder: bool = False
    # Speculative decoding: the last num_draft_tokens of token_ids are drafts (not known tokens; not in
    # all_token_ids). The runner returns 1..num_draft_tokens + 1 tokens for this seq: the drafts the
    # target model agrees with, then its own next token. Always 0 with placeholder / sample=False.
    num_draft_tokens: int = 0
    # Multi-LoRA: the device adapter slot this sequence runs with (0 = the base model, 1..max_loras:
    # an adapter the engine loaded into that slot for this step; jaxllm/lora).
    lora_slot: int = 0
    # Hybrid KV cache (jaxllm/core/hybrid_kv_cache_manager.py): every KV cache group's block table after this
    # step's allocation (block_ids is group 0's); -1 = a null entry (a sliding group's block out of its
    # window: never written, its device entry is a harmless id; also in block_ids for an all-sliding model's one
    # sliding group). None with the classic manager (one full-attention group). From the scheduler: a read-only
    # [G, n] int32 numpy array (HybridKVCacheManager.group_block_tables); lists of ints are accepted as well.
    group_block_ids: np.ndarray | list[list[int]] | None = None
    # bad_words: token ids the sampler must not pick this step (the engine fills them; every sampling
    # row of the seq gets them: a seq with drafts has only one-token bad words, banned at every row)
    banned_token_ids: list[int] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # running requests first, then newly scheduled ones
    num_batched_tokens: int
    # requests the runner must forget (free per-request state) before this step: finished,
    # aborted or preempted since the last step. Forgetting an unknown id is a no-op.
    finished_or_preempted_ids: list[str] = field(default_factory=list)
    # the scheduler's Request objects, parallel to seqs: update_from_output gives a sampled token
    # only to the very request that was scheduled (a finished id may be reused by a new request
    # while its last step is still in flight). The runner ignores it.
    requests: list = field(default_factory=list, repr=False)
    # structured outputs: [num_seqs, ceil(vocab_size / 32)] int32 packed allowed-token bits (bit t % 32
    # of word t // 32 = token t allowed), filled by the engine for the sampling seqs whose
    # ``constrained`` entry is True; None when no seq of the step has a grammar.
    grammar_bitmask: object = field(default=None, repr=False)
    constrained: list[bool] | None = None
    # async scheduling: a constrained seq runs on a token still in flight, so its mask is not known
    # yet. The runner launches the forward pass at dispatch and the sampling when the engine hands
    # the bitmask to ``PendingStep.set_bitmask(grammar_bitmask, constrained)`` (runner_protocol.py).
    late_bitmask: bool = False
    # forks admitted this step (beam search; KVCacheManager.pin_fork): (source block, destination
    # block) pairs whose whole KV the runner copies before the step runs (no step reads a
    # destination before)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request_id: len(s.token_ids) for s in self.seqs}

    @property
    def is_empty(self) -> bool:
        return not self.seqs
