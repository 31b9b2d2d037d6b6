"""On-device batched sampling with per-row parameters.

Order per row (documented; the tests' numpy reference follows it):
  00. structured outputs: rows with the ``constrained`` flag keep only the ids whose bit is set in
     their packed ``bitmask`` row (bit t % 32 of word t // 32; llguidance's layout), others -> -inf;
     one lax.cond over the batch, so a step without grammars skips the [S, V] unpack;
  0. allowed_token_ids (every other id gets -inf), then logit_bias added (vLLM's order);
  1. penalties on those logits: repetition (tokens seen in prompt or output: divide positive logits,
     multiply negative ones), then frequency (× output count) and presence (output seen);
  2. mask ids get -inf: EOS and stop ids while below min_tokens, and the step's bad_words bans
     (jaxllm/engine/bad_words.py; -inf absorbs, so their place after 0 and 1 changes no pick);
  3. greedy rows (temperature 0): argmax;
  4. others: logits / temperature, then top-k, then top-p over the top-k-renormalised
     distribution (keep the smallest prefix of sorted tokens whose mass reaches p), then min-p
     (drop tokens with prob < min_p × max prob), then a Gumbel-max draw.
Each row's key is fold_in(key(seed), position of the sampled token), so a request's draws do not
depend on what else is in the batch. Filters work as per-row logit thresholds applied in vocab
order, so whether the batch needed the sort (a lax.cond) never changes a row's result.
Branches: on CPU each skippable piece of work (grammar, allowed/bias, penalties, masks, the draw and
its filters, top logprobs) sits under a lax.cond on a device predicate (jnp.any over the batch). On a
GPU an XLA conditional copies its predicate to the host and blocks the host until the device reaches
it (XLA's ConditionalThunk: Memcpy + BlockHostUntilDone), which in a step program stalls the launch of
the next step behind the current one; there (`branchless=True`, `sampler_branchless()`) both sides are
computed and the predicate selects with jnp.where: the same values, no host round trip. The three
expensive branches are decided on the host instead, from the step's inputs (`SamplePlan`, `plan_of`):
the Gumbel draw (any sampled row), the [S, V] sort behind top-k / top-p / min-p (any sampled row with
a filter) and the top-20 log-softmax (any row asked for logprobs; XLA's top-k of 20 may sort too);
the runner compiles each S's valid plans (SAMPLE_PLANS) and picks one per step. The cheap branches
(grammar bitmask, allowed ids / bias, penalties, masks: [S, V] elementwise work and scatters) are
computed every step.
Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), like
vLLM's default: the sampled token's, its rank, and the top MAX_LOGPROBS. The rank is 1 + the number
of raw logits strictly greater than the sampled token's (so correct when it lies outside the top-k,
as a temperature draw may); one [S, V] compare and sum, always computed (no cond, no new program).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.gpu_defaults import gpu_default

MAX_LOGPROBS = 20
BRANCHES_ENV = "JAXLLM_SAMPLER_BRANCHES"  # auto (select on GPUs, cond elsewhere) | cond | select


def sampler_branchless(platform: str | None = None) -> bool:
    """Whether sampling selects between computed branches (True) or branches with lax.cond (False):
    $JAXLLM_SAMPLER_BRANCHES "cond" / "select", default "auto" = select on GPUs (`platform`, default
    jax.default_backend(): "gpu", "cuda" or "rocm"), cond on CPUs and TPUs (a TPU branches on the device)."""
    return gpu_default(BRANCHES_ENV, ("auto", "cond", "select"), "select", platform or jax.default_backend())


class SamplePlan(NamedTuple):
    """What a branchless sampling program computes at all (static; the host decides per step)."""
    draw: bool  # any row samples (temperature > 0): the Gumbel draw
    filters: bool  # any sampled row has top-k / top-p / min-p: the [S, V] sort (implies draw)
    top_logprobs: bool  # any row asked for logprobs: the top-MAX_LOGPROBS log-softmax


SAMPLE_PLANS = tuple(SamplePlan(d, f, lp) for d, f in ((False, False), (True, False), (True, True))
                     for lp in (False, True))
FULL_PLAN = SamplePlan(True, True, True)


def plan_of(p: "SamplingInputs", want_top_logprobs, vocab: int) -> SamplePlan:
    """Host (numpy inputs): the smallest plan that samples this step's rows exactly."""
    t, k, top_p, min_p = (np.asarray(x) for x in (p.temperature, p.top_k, p.top_p, p.min_p))
    sampled = t > 0
    filters = bool(np.any(sampled & (((k > 0) & (k < vocab)) | (top_p < 1) | (min_p > 0))))
    return SamplePlan(bool(np.any(sampled)), filters, bool(np.asarray(want_top_logprobs)))


def _branch(pred, on_true, on_false, branchless: bool, needed: bool = True):
    """jax.lax.cond over `pred`; with `branchless`, both sides computed and selected by `pred` (the
    same result, and no conditional for the device to report back to the host), or `on_false` alone
    when the host's plan says no row needs `on_true` (`needed` False)."""
    if not branchless:
        return jax.lax.cond(pred, on_true, on_false)
    if not needed:
        return on_false()
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true(), on_false())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: jax.Array  # [S] f32, 0 = greedy
    top_k: jax.Array  # [S] i32, <= 0 = off
    top_p: jax.Array  # [S] f32, 1 = off
    min_p: jax.Array  # [S] f32, 0 = off
    presence: jax.Array  # [S] f32
    frequency: jax.Array  # [S] f32
    repetition: jax.Array  # [S] f32, 1 = off
    seeds: jax.Array  # [S] u32
    positions: jax.Array  # [S] i32, position of the token being sampled
    mask_ids: jax.Array  # [S, M] i32, ids forbidden this step (min_tokens, bad_words), -1 = none
    bias_ids: jax.Array  # [S, B] i32, logit_bias ids, -1 = none
    bias_values: jax.Array  # [S, B] f32
    allowed_ids: jax.Array  # [S, A] i32, allowed_token_ids, -1 = none (a row without any allows all)
    bitmask: jax.Array  # [S, ceil(V / 32)] i32, structured outputs: packed allowed-token bits
    constrained: jax.Array  # [S] bool, the row's bitmask applies


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, raw logprob of the sampled token
    ranks: jax.Array  # [S] i32, 1-based rank of the sampled token in the raw distribution
    top_ids: jax.Array  # [S, MAX_LOGPROBS] i32
    top_logprobs: jax.Array  # [S, MAX_LOGPROBS] f32


def apply_penalties(logits, counts, seen_in_prompt, p: SamplingInputs):
    """logits [S, V] f32; counts [S, V] i32 (output tokens); seen_in_prompt [S, V] bool."""
    seen = seen_in_prompt | (counts > 0)
    rep = p.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - p.frequency[:, None] * counts.astype(jnp.float32)
    return logits - p.presence[:, None] * (counts > 0).astype(jnp.float32)


def _filter_thresholds(scaled, p: SamplingInputs):
    """Per-row smallest kept logit after top-k, top-p and min-p: [S] f32 (-inf keeps all)."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [S, V] f32
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)[:, None]
    in_k = rank < k
    masked = jnp.where(in_k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)  # renormalised over the top-k
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & (mass_before < p.top_p[:, None])
    keep &= probs >= p.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the best token always survives
    last_kept = jnp.sum(keep, axis=-1) - 1  # kept tokens form a prefix of the sorted order
    return jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)[:, 0]


def sample(logits, counts, seen_in_prompt, p: SamplingInputs, want_top_logprobs, rows=None,
           branchless: bool = False, plan: SamplePlan = FULL_PLAN) -> SamplerOutput:
    """logits [S, V] f32 raw → SamplerOutput. want_top_logprobs: bool scalar (any row asked for logprobs).
    `branchless`: every branch computed and selected instead of lax.cond (the module docstring: GPUs);
    then `plan` (static, `plan_of` the same inputs) leaves out the draw, the filters' sort and the top
    logprobs where no row needs them (a plan smaller than plan_of's would sample those rows wrong).

    counts [S, V] i32 / seen_in_prompt [S, V] bool per row; or, with rows [S] i32, the whole penalty
    tables [R, V] and each row's index into them. Work a batch does not need is skipped by lax.cond
    (results do not depend on it): penalties (and the tables' row gathers) when no row has one, the
    min_tokens mask when no row has ids to mask, temperature / filters / the draw when every row is
    greedy, the [S, V] log-softmax when nobody wants top logprobs."""
    vocab = logits.shape[-1]
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [S, 1] f32
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1))  # [S] f32, as jax.nn.log_softmax

    row_idx = jnp.arange(logits.shape[0])[:, None]  # [S, 1]
    grammar_logits = _branch(jnp.any(p.constrained), lambda: apply_bitmask(logits, p.bitmask, p.constrained),
                             lambda: logits, branchless)  # [S, V] f32; logprobs below stay the raw logits'

    def restricted():  # allowed_token_ids, then logit_bias
        allowed_cols = jnp.where(p.allowed_ids >= 0, p.allowed_ids, vocab)  # -1 → out of range → dropped
        allowed = jnp.zeros(logits.shape, bool).at[row_idx, allowed_cols].set(True, mode="drop")  # [S, V]
        has_list = jnp.any(p.allowed_ids >= 0, axis=-1, keepdims=True)  # [S, 1]
        out = jnp.where(has_list & ~allowed, -jnp.inf, grammar_logits)
        bias_cols = jnp.where(p.bias_ids >= 0, p.bias_ids, vocab)
        return out.at[row_idx, bias_cols].add(p.bias_values, mode="drop")

    base = _branch(jnp.any(p.allowed_ids >= 0) | jnp.any(p.bias_ids >= 0), restricted,
                   lambda: grammar_logits, branchless)

    def penalised():
        c, seen = (counts, seen_in_prompt) if rows is None else (counts[rows], seen_in_prompt[rows])
        return apply_penalties(base, c, seen, p)

    has_penalty = (p.repetition != 1) | (p.frequency != 0) | (p.presence != 0)  # [S] bool
    processed = _branch(jnp.any(has_penalty), penalised, lambda: base, branchless)

    def masked():
        mask_cols = jnp.where(p.mask_ids >= 0, p.mask_ids, vocab)  # -1 → out of range → dropped
        forbid = jnp.zeros(processed.shape, bool).at[row_idx, mask_cols].set(True, mode="drop")  # [S, V] bool
        return jnp.where(forbid, -jnp.inf, processed)

    processed = _branch(jnp.any(p.mask_ids >= 0), masked, lambda: processed, branchless)
    greedy = p.temperature <= 0

    def draw():  # Gumbel-max over the filtered logits; skipped when every row is greedy
        scaled = processed / jnp.where(greedy, 1.0, p.temperature)[:, None]
        needs_filter = (~greedy) & ((p.top_k > 0) & (p.top_k < vocab) | (p.top_p < 1) | (p.min_p > 0))
        thresholds = _branch(
            jnp.any(needs_filter), lambda: jnp.where(needs_filter, _filter_thresholds(scaled, p), -jnp.inf),
            lambda: jnp.full(scaled.shape[:1], -jnp.inf, jnp.float32), branchless, plan.filters)
        filtered = jnp.where(scaled >= thresholds[:, None], scaled, -jnp.inf)
        keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p.seeds, p.positions)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)  # [S, V] f32
        return jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)

    drawn = _branch(jnp.any(~greedy), draw, lambda: jnp.zeros(logits.shape[:1], jnp.int32), branchless, plan.draw)
    token_ids = jnp.where(greedy, jnp.argmax(processed, axis=-1), drawn).astype(jnp.int32)
    top_lp, top_ids = _branch(
        want_top_logprobs, lambda: tuple(jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), MAX_LOGPROBS)),
        lambda: (jnp.zeros((logits.shape[0], MAX_LOGPROBS), jnp.float32),
                 jnp.zeros((logits.shape[0], MAX_LOGPROBS), jnp.int32)), branchless, plan.top_logprobs)
    picked = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0]  # [S] f32 raw logit
    chosen = (picked - row_max[:, 0]) - log_sum  # raw logprob, the same arithmetic as log_softmax
    ranks = token_rank(logits, picked)  # [S] i32
    return SamplerOutput(token_ids, chosen, ranks, top_ids.astype(jnp.int32), top_lp)


def apply_bitmask(logits, bitmask, constrained):
    """logits [S, V] f32, bitmask [S, W] i32 (W = ceil(V / 32)), constrained [S] bool → [S, V] f32 with
    the ids whose bit is clear set to -inf in constrained rows."""
    cols = jnp.arange(logits.shape[-1], dtype=jnp.int32)  # [V]
    words = jnp.take(bitmask, cols // 32, axis=1)  # [S, V] i32
    allowed = (jnp.right_shift(words, cols % 32) & 1) == 1  # [S, V] bool (arithmetic shift, then & 1)
    return jnp.where(constrained[:, None] & ~allowed, -jnp.inf, logits)


def token_rank(logits, picked):
    """logits [N, V] f32, picked [N] f32 (a logit of each row) → [N] i32: 1 + how many logits of
    the row are strictly greater (vLLM's 1-based rank in the full distribution; ties share a rank)."""
    return (jnp.sum(logits > picked[:, None], axis=-1) + 1).astype(jnp.int32)
