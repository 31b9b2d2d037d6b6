"""Host-side assembly of one step's flat ragged batch (numpy), padded to a bucket."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxllm.core.scheduler_output import ScheduledSeq
from jaxllm.runner.sampler import SamplingInputs
from jaxllm.sampling_params import MAX_ALLOWED_TOKEN_IDS, MAX_BAD_WORDS, MAX_LOGIT_BIAS
from pallas_kernels import AttentionMetadata

MAX_MIN_TOKENS_MASK = 32  # EOS + stop_token_ids masked while below min_tokens
# mask_ids width: those, then the step's bad_words bans (at most 2 per word, ScheduledSeq.banned_token_ids)
MAX_MASK_IDS = MAX_MIN_TOKENS_MASK + 2 * MAX_BAD_WORDS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array  # [T] i32
    positions: jax.Array  # [T] i32
    metadata: AttentionMetadata
    # [S] i32, per sampling row: the token whose logits it samples from. A sequence has one row (its
    # last token) or, with d speculative drafts, d + 1 consecutive rows (its last d + 1 tokens; see
    # sample_rows); the attention metadata's S indexes sequences, these arrays sampling rows.
    logits_indices: jax.Array
    seq_rows: jax.Array  # [S] i32, per sampling row: penalty-state row (padding → the spare row)
    reset_rows: jax.Array  # [S] i32, rows to clear before this step (R = none)
    prompt_rows: jax.Array  # [T] i32, row of prompt tokens (R = not a prompt token)
    output_rows: jax.Array  # [T] i32, row of generated tokens fed back (R = not one)
    # Tokens the runner never saw being fed (prefix-cache hits, resumes) that penalties must count.
    seen_tokens: jax.Array  # [X] i32
    seen_prompt_rows: jax.Array  # [X] i32 (R = none)
    seen_output_rows: jax.Array  # [X] i32 (R = none)
    sampling: SamplingInputs
    want_top_logprobs: jax.Array  # [] bool, any sequence asked for top logprobs
    # Async scheduling: [T] i32, the penalty row whose last sampled token (the runner's device
    # buffer) replaces tokens[t]; R = tokens[t] is the host's. A placeholder decode feeds the token
    # the previous step sampled for its row without a trip through the host.
    feed_rows: jax.Array
    # Multi-LoRA: [T] i32, each token's adapter slot (ScheduledSeq.lora_slot; 0 = the base model,
    # padding tokens 0); None when the runner has no LoRA (the step then has no such input)
    lora_slots: jax.Array | None = None


def sample_rows(seqs: list[ScheduledSeq]) -> list[int]:
    """The first sampling row of each seq (one row each, d + 1 for a seq with d drafts); the
    last entry is the total."""
    out = [0]
    for s in seqs:
        out.append(out[-1] + 1 + s.num_draft_tokens)
    return out


def place_bitmask(seqs: list[ScheduledSeq], padded_seqs: int, vocab_size: int,
                  grammar_bitmask: np.ndarray | None, constrained: list[bool] | None) -> tuple[np.ndarray, np.ndarray]:
    """SchedulerOutput's grammar bitmask ([len(seqs), W] i32) and `constrained` flags moved to the
    seqs' sampling rows → (bitmask [S, W] i32 packed allowed bits, constrained [S] bool); all zero
    (every row free) without them."""
    bitmask = np.zeros((padded_seqs, -(-vocab_size // 32)), np.int32)  # [S, W] i32
    rows = np.zeros(padded_seqs, bool)  # [S] bool
    if constrained is not None and any(constrained):
        at = sample_rows(seqs)[:-1]  # seqs with a grammar get no drafts: one row each
        bitmask[at] = grammar_bitmask
        rows[at] = constrained
    return bitmask, rows


def _null_block_written(s: ScheduledSeq) -> RuntimeError:
    return RuntimeError(f"request_id={s.request_id!r}: a KV cache group has a null block under a token it writes "
                        f"(positions {s.start_pos}..{s.start_pos + len(s.token_ids) - 1})")


def build_inputs(seqs: list[ScheduledSeq], rows: list[int], num_rows: int, eos_ids: list[int],
                 padded_tokens: int, padded_seqs: int, decode_only: bool, block_size: int,
                 max_blocks: int, max_seen: int, seed_steps: list | None = None, *, vocab_size: int,
                 grammar_bitmask: np.ndarray | None = None, constrained: list[bool] | None = None,
                 lora: bool = False, num_groups: int = 1) -> StepInputs:
    """Numpy arrays for one step. `rows[i]` is seqs[i]'s penalty row; row `num_rows - 1` is spare.
    `grammar_bitmask` [len(seqs), ceil(vocab_size / 32)] i32 and `constrained` (SchedulerOutput's)
    restrict the constrained seqs' next token; without them every row is free (an all-zero mask).
    `lora`: fill `lora_slots` [T] from each seq's lora_slot (else it stays None).
    Each seq's tables are its group_block_ids (the hybrid manager's, one per KV cache group) or its block_ids;
    null entries -1 (blocks a sliding group freed) → block 0: masked, never written. `num_groups` > 1 (hybrid
    KV cache): the metadata's group_slot_mapping [G, T] and group_block_tables [G, S, max_blocks] too; the
    slot_mapping and block_tables are group 0's (one write).

    Prefix-cache hits seed penalty state with up to `max_seen` tokens per step. When the step's
    hits carry more and `seed_steps` is a list, the prefixes go instead into all-padding inputs of
    the same bucket appended to `seed_steps` (run them first, in order); otherwise they are capped."""
    T, S, R = padded_tokens, padded_seqs, num_rows
    spare = R - 1
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    prompt_rows = np.full(T, R, np.int32)
    output_rows = np.full(T, R, np.int32)
    feed_rows = np.full(T, R, np.int32)
    lora_slots = np.zeros(T, np.int32) if lora else None
    G = num_groups
    # every group's slots and tables, written once: group 0's are the metadata's slot_mapping / block_tables
    group_slots = np.full((G, T), -1, np.int32)  # [G, T] i32
    group_tables = np.zeros((G, S, max_blocks), np.int32)  # [G, S, max_blocks] i32
    context_lens = np.zeros(S, np.int32)
    prompt_lens = np.zeros(S, np.int32)  # [S] longrope's set choice (jaxllm/models/rope.py)
    cu = np.zeros(S + 1, np.int32)
    logits_idx = np.zeros(S, np.int32)
    seq_rows = np.full(S, spare, np.int32)
    reset_rows = np.full(S, R, np.int32)
    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    sample_pos = np.zeros(S, np.int32)
    mask_ids = np.full((S, MAX_MASK_IDS), -1, np.int32)
    bias_ids = np.full((S, MAX_LOGIT_BIAS), -1, np.int32)
    bias_values = np.zeros((S, MAX_LOGIT_BIAS), np.float32)
    allowed_ids = np.full((S, MAX_ALLOWED_TOKEN_IDS), -1, np.int32)
    bitmask, constrained_rows = place_bitmask(seqs, S, vocab_size, grammar_bitmask, constrained)
    first_row = sample_rows(seqs)
    seen_tokens = np.zeros(max_seen, np.int32)
    seen_prompt_rows = np.full(max_seen, R, np.int32)
    seen_output_rows = np.full(max_seen, R, np.int32)
    seen = []  # (tokens, prompt rows, output rows) per sequence with a prefix-cache hit
    prefixed = []  # indices of sequences whose penalty rows this step (re)starts

    t = 0
    used = 0  # table columns any seq fills
    for i, (s, row) in enumerate(zip(seqs, rows)):
        n = len(s.token_ids)
        if s.placeholder:  # its one token is on the device: the last one sampled for this row
            feed_rows[t] = row
        else:
            tokens[t:t + n] = s.token_ids
        if lora:
            lora_slots[t:t + n] = s.lora_slot
        if n == 1 and s.group_block_ids is None and G == 1:  # a decode token, one table: Python scalars
            p0 = s.start_pos  # (the numpy calls below cost ~10 us a sequence: most of a 256-row step's inputs)
            positions[t] = p0
            prompt_rows[t], output_rows[t] = (row, R) if p0 < s.num_prompt_tokens else (R, row)
            ids = s.block_ids  # (the scheduler's: an int32 array, copied with one slice assignment)
            b = int(ids[p0 // block_size])
            if b < 0:
                raise _null_block_written(s)
            group_slots[0, t] = b * block_size + p0 % block_size
            group_tables[0, i, :len(ids)] = ids  # nulls (-1) → block 0 below, for every seq at once
            used = max(used, len(ids))
        else:
            pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
            positions[t:t + n] = pos
            is_prompt = pos < s.num_prompt_tokens
            prompt_rows[t:t + n] = np.where(is_prompt, row, R)
            output_rows[t:t + n] = np.where(is_prompt, R, row)
            # every group's table, one entry per block of the sequence; -1 = null (a sliding group's block out
            # of its window: also in the one table of an all-sliding model's single sliding group)
            table = np.asarray(s.block_ids if s.group_block_ids is None else s.group_block_ids, np.int32)
            table = table[None] if table.ndim == 1 else table  # [G, n_blocks] i32
            if table.shape[0] != G:
                raise RuntimeError(f"request_id={s.request_id!r}: {table.shape[0]} block tables for num_groups={G}")
            written = table[:, pos // block_size]  # [G, n] i32
            if (written < 0).any():
                raise _null_block_written(s)
            group_slots[:, t:t + n] = written * block_size + pos % block_size
            group_tables[:, i, :table.shape[1]] = table  # nulls (-1) → block 0 below
            used = max(used, table.shape[1])
        context_lens[i] = s.start_pos + n
        prompt_lens[i] = s.num_prompt_tokens
        t += n
        cu[i + 1] = t
        if s.start_pos == 0 or s.prefix_token_ids is not None:
            reset_rows[i] = row
            prefixed.append(i)
        if s.prefix_token_ids:
            pre = np.asarray(s.prefix_token_ids, np.int32)
            ppos = np.arange(len(pre))
            seen.append((pre, np.where(ppos < s.num_prompt_tokens, row, R), np.where(ppos < s.num_prompt_tokens, R, row)))
        p = s.params
        d = s.num_draft_tokens
        for r in range(first_row[i], first_row[i + 1]):  # row r samples the token at position sample_pos
            j = r - first_row[i]  # 0..d: the token after draft j - 1 (the known tokens' next one when 0)
            logits_idx[r] = t - 1 - d + j
            seq_rows[r] = row
            temperature[r] = p.temperature
            top_k[r] = p.top_k if p.top_k and p.top_k > 0 else 0
            top_p[r], min_p[r] = p.top_p, p.min_p
            presence[r], frequency[r], repetition[r] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            seeds[r] = s.seed & 0xFFFFFFFF
            sample_pos[r] = s.start_pos + n - d + j  # the key depends on it: as if sampled without drafts
            generated = sample_pos[r] - s.num_prompt_tokens
            banned = []
            if generated < p.min_tokens:
                banned = list(p.stop_token_ids or []) + ([] if p.ignore_eos else list(eos_ids))
                banned = banned[:MAX_MIN_TOKENS_MASK]
            banned += s.banned_token_ids[:MAX_MASK_IDS - len(banned)]
            mask_ids[r, :len(banned)] = banned
            if p.logit_bias:
                bias_ids[r, :len(p.logit_bias)] = list(p.logit_bias)
                bias_values[r, :len(p.logit_bias)] = list(p.logit_bias.values())
            if p.allowed_token_ids:
                allowed_ids[r, :len(p.allowed_token_ids)] = p.allowed_token_ids
    cu[len(seqs) + 1:] = t
    if used:  # null entries (-1: a sliding group's blocks out of its window) → block 0: masked, never written
        filled = group_tables[:, :, :used]
        np.maximum(filled, 0, out=filled)
    if seen:
        all_seen = [np.concatenate(a) for a in zip(*seen)]
        if len(all_seen[0]) > max_seen and seed_steps is not None:
            # more than one step can carry: reset and seed the rows in padding steps run before this one
            for j, lo in enumerate(range(0, len(all_seen[0]), max_seen)):
                pad = build_inputs([], [], num_rows, eos_ids, padded_tokens, padded_seqs, decode_only, block_size,
                                   max_blocks, max_seen, vocab_size=vocab_size, lora=lora, num_groups=num_groups)
                chunk = [a[lo:lo + max_seen] for a in all_seen]
                n = len(chunk[0])
                seen_tokens_j = pad.seen_tokens.copy()
                seen_p_j, seen_o_j = pad.seen_prompt_rows.copy(), pad.seen_output_rows.copy()
                seen_tokens_j[:n], seen_p_j[:n], seen_o_j[:n] = chunk
                seed_steps.append(dataclasses.replace(
                    pad, reset_rows=reset_rows.copy() if j == 0 else pad.reset_rows, seen_tokens=seen_tokens_j,
                    seen_prompt_rows=seen_p_j, seen_output_rows=seen_o_j))
            reset_rows[prefixed] = R
        else:  # capped at max_seen: penalties may under-count beyond it
            n = min(max_seen, len(all_seen[0]))
            seen_tokens[:n], seen_prompt_rows[:n], seen_output_rows[:n] = (a[:n] for a in all_seen)
    hybrid = G > 1
    meta = AttentionMetadata(slot_mapping=group_slots[0], block_tables=group_tables[0], context_lens=context_lens,
                             cu_q_lens=cu, decode_only=decode_only, prompt_lens=prompt_lens,
                             group_slot_mapping=group_slots if hybrid else None,
                             group_block_tables=group_tables if hybrid else None)
    sampling = SamplingInputs(temperature, top_k, top_p, min_p, presence, frequency, repetition, seeds,
                              sample_pos, mask_ids, bias_ids, bias_values, allowed_ids, bitmask, constrained_rows)
    want = np.asarray(any(s.params.logprobs for s in seqs))
    return StepInputs(tokens, positions, meta, logits_idx, seq_rows, reset_rows, prompt_rows, output_rows,
                      seen_tokens, seen_prompt_rows, seen_output_rows, sampling, want, feed_rows, lora_slots)
