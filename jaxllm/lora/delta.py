"""The LoRA delta inside the jitted step: `y = x @ W + (x @ A[slot]) @ B[slot]` per token.

Pytrees the model sees (built by the runner, jaxllm/lora/slots.py):
- `LoRAPair(a, b)`: one held projection's adapter slots, a [(L,) in..., S, P·R] (its P fused parts'
  A side by side on the rank axis) and b [(L,) S, P·R, out...] block-diagonal over the parts: rows
  pR..pR+R hold part p's B in part p's columns of the fused output (its shard-major order, the base
  weight's: jaxllm/models/fusion.py), zeros elsewhere (S = max_loras slots; the base model, slot 0,
  has no storage: see below).
- `LoRABatch(weights, slots)`: every targeted projection's pairs (scan loop: {name: stacked pair};
  unroll loop: one {name: pair} per layer) and the per-token slot index slots [T] i32 (0 = base).
- `LoRAWeight(base, a, b)`: a layer's weight with its pairs attached, what the Projector receives in
  place of the plain weight (`with_lora`): the decoder layer's code does not change.

The formulation is the one-hot einsum over slots (sglang-jax's): u = x·A for every slot [T, S·P·R]
(one plain [T, in] x [in, S·P·R] matmul: the slot axis sits after A's input axes), zeroed except
the token's own slot (one elementwise multiply), then one u·B contracting slots and ranks
[T, S·P·R] x [S·P·R, out] straight into the fused output: two matmuls per projection whatever its
number of fused parts, and no transposed copy of A, u or B (the tiny Llama's CPU HLO: the LoRA
decode step's transposes/copies are the base step's). It reads each slot's A/B once per step whatever the number of tokens, at
the price of S times the delta's FLOPs. Gathering each token's A[slot], B[slot] ([T, in, P·R] and
[T, R, out_p]) materialises T copies: measured on CPU for SmolLM2's wqkv (4 slots, rank 16, f32;
`python bench/lora_step.py`, 2 shared cores), one-hot vs gather: T=64 0.33-0.39 vs 0.67-1.07 ms,
T=512 0.9-1.3 vs 29-49 ms, T=2048 2.7-4.6 vs 108-186 ms (the base [576, 960] matmul: 0.6, 1.8-3.1,
6.7-12 ms). Slot 0 (the base) is an all-zero one-hot row, so it needs no storage: the arrays hold
slots 1..S at 0..S-1.

Why B is block-diagonal (P x the bytes of one B per part for wqkv and w_gate_up, the zeros read
every step): on a GPU every matmul is a kernel launch of a few microseconds whatever its size; one B
per part took P expand matmuls and a concatenate per fused projection, 11 small dots per layer where
this takes 8 (bench/RESULTS.md, "LoRA: one expand matmul per projection").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAPair:
    a: jax.Array  # [(L,) in..., S, P*R]
    b: jax.Array  # [(L,) S, P*R, out...]: block-diagonal over the P fused parts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """One layer's projection weight (an array or a QuantWeight) with its LoRA slots."""
    base: object
    a: jax.Array  # [in..., S, P*R]
    b: jax.Array  # [S, P*R, out...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRABatch:
    weights: object  # scan: {name: LoRAPair stacked [L, ...]}; unroll: [{name: LoRAPair}] * L
    slots: jax.Array  # [T] i32 per-token adapter slot, 0 = base (padding tokens: 0)

    def onehot(self, dtype) -> jax.Array:
        """[T, S] in `dtype`: row t is one-hot at slots[t] - 1, all zero for the base."""
        unrolled = isinstance(self.weights, (list, tuple))
        pair = next(iter((self.weights[0] if unrolled else self.weights).values()))
        num_slots = pair.b.shape[0 if unrolled else 1]
        return jax.nn.one_hot(self.slots - 1, num_slots, dtype=dtype)


def with_lora(weights: dict, pairs: dict) -> dict:
    """A layer's weights by short name with each targeted one wrapped in a LoRAWeight."""
    return {n: LoRAWeight(w, pairs[n].a, pairs[n].b) if n in pairs else w for n, w in weights.items()}


def lora_delta(spec: str, x: jax.Array, a: jax.Array, b: jax.Array, onehot: jax.Array) -> jax.Array:
    """The delta of `jnp.einsum(spec, x, w)` (spec: tokens first, the weight input-major, e.g.
    "thd,hde->te"): x [T, in...], a [in..., S, P*R], b [S, P*R, out...] (block-diagonal over the
    fused parts, in the fused output's order), onehot [T, S] → [T, out...]. Two matmuls."""
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    outs = ws[x.ndim - 1:]
    t = xs[0]
    # Both matmuls as plain 2-D gemms over merged axes: an einsum contracting two axes (wo's heads and
    # head_dim; slots and ranks) may list them in an order that makes XLA transpose a copy of an
    # operand for the dot (seen in the CPU HLO: a copy of A, of u and of B per projection and step).
    T = x.shape[0]
    u = jnp.dot(x.reshape(T, -1), a.reshape(-1, a.shape[-2] * a.shape[-1]))  # [T, S*P*R]
    u = u * jnp.repeat(onehot, a.shape[-1], axis=1)  # only the token's own slot survives
    b = b.reshape((-1,) + b.shape[2:])  # [S*P*R, out...]
    return jnp.einsum(f"{t}K,K{outs}->{out}", u, b)  # [T, out...]
