"""The device programs a ModelRunner compiles (runner/model_runner.py jits, lowers and runs them):

- `fed_forward`: one scheduled step's model pass: placeholder tokens fed from the device's last sampled
  ids, the penalty tables updated, the model run over the padded batch (KV cache written in place),
  the logits of each sequence's sampling rows;
- `sample_step`: that step's sampling on device, from its logits, and each row's sampled id recorded
  for the next step's placeholders. A program of its own so that the runner can launch it after the
  forward pass, once the host knows the grammar bitmask (async scheduling: a constrained request's
  mask needs the token the step before sampled);
- `prompt_logprobs`: the prompt-logprobs pass over a step's hidden states, in chunks;
- `embed_step`: the embed task's step: pooled hidden states, nothing sampled;
- `classify_step`: the classify task's: the classifier head's logits of each sequence's last token.

They close over the model's graph definition only; the weights (`state`) are an argument of each.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.lora.delta import LoRABatch
from jaxllm.runner.inputs import StepInputs
from jaxllm.runner.pooler import pool_hidden
from jaxllm.runner.sampler import FULL_PLAN, MAX_LOGPROBS, sample, token_rank

PROMPT_LP_CHUNK = 256  # tokens per chunk of the prompt-logprobs LM head


class StepPrograms(NamedTuple):
    fed_forward: Callable
    sample_step: Callable
    prompt_logprobs: Callable
    embed_step: Callable
    classify_step: Callable


def step_programs(graphdef, on_trace: Callable[[], None], branchless_sampling: bool = False) -> StepPrograms:
    """The programs of a model split into `graphdef` + state (nnx.split); `on_trace()` runs each
    time the step (forward or sampling) or the embed step is traced (the runner counts traces: one after warm-up is a bug).
    `branchless_sampling` (GPUs): sample_step selects between computed branches instead of lax.cond
    (runner/sampler.py: an XLA conditional on a GPU blocks the host until the device reaches it)."""

    def fed_forward(state, cache, counts, prompt_mask, last_tokens, inp: StepInputs, lora=None, decode_mha_group=None):
        """The model over the step's tokens, placeholders taken from last_tokens on device (feed_rows
        < R) → (cache, counts, prompt_mask, logits [S, V] f32 of the sampling rows, hidden [T, E]: it
        stays on device for prompt logprobs). `lora`: the LoRA slots' weights (a jit argument: loading
        a slot recompiles nothing). `inp.sampling` is not read here (sample_step's).
        `decode_mha_group` (static): the GPU decode attention kernel's head group the runner chose at
        warm-up (runner/decode_tuning.py; 0 = the one-head kernel), None = the kernels' default."""
        on_trace()  # runs only while tracing
        R = last_tokens.shape[0]
        fed = last_tokens[jnp.minimum(inp.feed_rows, R - 1)]  # [T] i32
        tokens = jnp.where(inp.feed_rows < R, fed, inp.tokens)  # [T] i32
        m = nnx.merge(graphdef, state)
        counts = counts.at[inp.reset_rows].set(0, mode="drop")
        prompt_mask = prompt_mask.at[inp.reset_rows].set(False, mode="drop")
        prompt_mask = prompt_mask.at[inp.prompt_rows, tokens].set(True, mode="drop")
        counts = counts.at[inp.output_rows, tokens].add(1, mode="drop")
        prompt_mask = prompt_mask.at[inp.seen_prompt_rows, inp.seen_tokens].set(True, mode="drop")
        counts = counts.at[inp.seen_output_rows, inp.seen_tokens].add(1, mode="drop")
        lora = None if lora is None else LoRABatch(lora, inp.lora_slots)
        attn = {} if decode_mha_group is None else {"decode_mha_group": decode_mha_group}
        hidden, cache = m(tokens, inp.positions, cache, inp.metadata, lora, **attn)  # [T, E]
        logits = m.compute_logits(hidden[inp.logits_indices])  # [S, V] f32
        return cache, counts, prompt_mask, logits, hidden

    def sample_step(logits, counts, prompt_mask, last_tokens, sampling, want_top_logprobs, seq_rows, plan=FULL_PLAN):
        """Sampling of one step's rows (the penalty tables' rows are gathered only if a penalty needs
        them) → (last_tokens with each row's sampled id set (padding rows write the spare row only),
        SamplerOutput). `plan` (static; branchless sampling only): what the step's rows need computed
        at all (sampler.plan_of)."""
        on_trace()  # runs only while tracing
        out = sample(logits, counts, prompt_mask, sampling, want_top_logprobs, rows=seq_rows,
                     branchless=branchless_sampling, plan=plan)
        return last_tokens.at[seq_rows].set(out.token_ids), out

    def prompt_logprobs(state, hidden, targets):
        """Raw logprob and rank of each token's next prompt token and the top MAX_LOGPROBS,
        computed in chunks of PROMPT_LP_CHUNK tokens so [T, V] logits never exist at once."""
        m = nnx.merge(graphdef, state)
        n = hidden.shape[0]
        c = min(PROMPT_LP_CHUNK, n)
        pad = -n % c
        h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, c, hidden.shape[-1])  # [n/c, c, E]
        t = jnp.pad(targets, (0, pad)).reshape(-1, c)  # [n/c, c] i32

        def chunk(args):
            hc, tc = args
            logits = m.compute_logits(hc)  # [c, V] f32
            lp = jax.nn.log_softmax(logits, axis=-1)  # [c, V] f32
            top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)  # [c, MAX_LOGPROBS]
            tgt = jnp.maximum(tc, 0)[:, None]  # [c, 1] i32
            rank = token_rank(logits, jnp.take_along_axis(logits, tgt, axis=-1)[:, 0])  # [c] i32
            return jnp.take_along_axis(lp, tgt, axis=-1)[:, 0], rank, top_ids, top_lp

        lp, rank, ids, top = jax.lax.map(chunk, (h, t))
        return (lp.reshape(-1)[:n], rank.reshape(-1)[:n], ids.reshape(-1, MAX_LOGPROBS)[:n],
                top.reshape(-1, MAX_LOGPROBS)[:n])

    def embed_step(state, cache, inp: StepInputs):
        """Prefill chunks → (cache, per-sequence hidden sums [S, E] f32, last hidden [S, E] f32)."""
        on_trace()  # runs only while tracing
        m = nnx.merge(graphdef, state)
        hidden, cache = m(inp.tokens, inp.positions, cache, inp.metadata)  # [T, E]
        sums, last = pool_hidden(hidden, inp.metadata.cu_q_lens, inp.logits_indices)
        return cache, sums, last

    def classify_step(state, cache, inp: StepInputs):
        """Prefill chunks → (cache, the head's logits of each sequence's last token [S, num_labels] f32;
        the host keeps a prompt's final chunk's)."""
        on_trace()  # runs only while tracing
        m = nnx.merge(graphdef, state)
        hidden, cache = m(inp.tokens, inp.positions, cache, inp.metadata)  # [T, E]
        return cache, m.classify(hidden[inp.logits_indices])  # [S, L] f32

    return StepPrograms(fed_forward, sample_step, prompt_logprobs, embed_step, classify_step)
