"""The LoRA delta inside the jitted step: `y = x @ W + (x @ A[slot]) @ B[slot]` per token.

Pytrees the model sees (built by the runner, jaxllm/lora/slots.py):
- `LoRAPair(a, b)`: one held projection's adapter slots, a [(L,) S, in..., P·R], b [(L,) S, P·R, out...]
  (S = max_loras slots; the base model, slot 0, has no storage: see below).
- `LoRABatch(weights, slots)`: every targeted projection's pairs (scan loop: {name: stacked pair};
  unroll loop: one {name: pair} per layer) and the per-token slot index slots [T] i32 (0 = base).
- `LoRAWeight(base, a, b)`: a layer's weight with its pairs attached, what the Projector receives in
  place of the plain weight (`with_lora`): the decoder layer's code does not change.

The formulation is the one-hot einsum over slots (sglang-jax's): u = x·A for every slot [T, S, P·R],
zeroed except the token's own slot, then u·B summed over slots and rank. It reads each slot's A/B
once per step whatever the number of tokens, at the price of S times the delta's FLOPs. Gathering
each token's A[slot], B[slot] ([T, in, P·R] and [T, P·R, out]) materialises T copies: measured on
CPU for SmolLM2's fused wqkv (4 slots, rank 16, f32; `python bench/lora_step.py`, a loaded 2-core
machine), one-hot vs gather: T=64 0.33-0.51 vs 1.2-1.5 ms, T=512 1.9 vs 123-184 ms, T=2048 5.7-10 vs
470-680 ms (the base matmul: 0.5, 3-11, 16-30 ms). Slot 0 (the base) is an all-zero one-hot row, so
it needs no storage: the arrays hold slots 1..S at indices 0..S-1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAPair:
    a: jax.Array  # [(L,) S, in..., P*R]
    b: jax.Array  # [(L,) S, P*R, out...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """One layer's projection weight (an array or a QuantWeight) with its LoRA slots."""
    base: object
    a: jax.Array  # [S, in..., P*R]
    b: jax.Array  # [S, P*R, out...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRABatch:
    weights: object  # scan: {name: LoRAPair stacked [L, S, ...]}; unroll: [{name: LoRAPair [S, ...]}] * L
    slots: jax.Array  # [T] i32 per-token adapter slot, 0 = base (padding tokens: 0)

    def onehot(self, dtype) -> jax.Array:
        """[T, S] in `dtype`: row t is one-hot at slots[t] - 1, all zero for the base."""
        leaf = jax.tree.leaves(self.weights)[0]
        num_slots = leaf.shape[0] if isinstance(self.weights, (list, tuple)) else leaf.shape[1]
        return jax.nn.one_hot(self.slots - 1, num_slots, dtype=dtype)


def with_lora(weights: dict, pairs: dict) -> dict:
    """A layer's weights by short name with each targeted one wrapped in a LoRAWeight."""
    return {n: LoRAWeight(w, pairs[n].a, pairs[n].b) if n in pairs else w for n, w in weights.items()}


def lora_delta(spec: str, x: jax.Array, a: jax.Array, b: jax.Array, onehot: jax.Array) -> jax.Array:
    """The delta of `jnp.einsum(spec, x, w)` (spec: tokens first, the weight input-major, e.g.
    "thd,hde->te"): x [T, in...], a [S, in..., P*R], b [S, P*R, out...], onehot [T, S] → [T, out...]."""
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    ins = "".join(ch for ch in ws if ch in xs)
    outs = ws[len(ins):]
    t = xs[0]
    u = jnp.einsum(f"{xs},S{ins}R->{t}SR", x, a)  # [T, S, P*R]
    u = u * onehot[:, :, None]  # only the token's own slot survives
    return jnp.einsum(f"{t}SR,SR{outs}->{out}", u, b)  # [T, out...]
