"""The LoRA delta inside the jitted step: `y = x @ W + (x @ A[slot]) @ B[slot]` per token.

Pytrees the model sees (built by the runner, jaxllm/lora/slots.py):
- `LoRAPair(a, b)`: one held projection's adapter slots, a [(L,) S, in..., P·R] (its P fused parts'
  A side by side) and b = one [(L,) S, R, out_p...] per part (S = max_loras slots; the base model,
  slot 0, has no storage: see below).
- `LoRABatch(weights, slots)`: every targeted projection's pairs (scan loop: {name: stacked pair};
  unroll loop: one {name: pair} per layer) and the per-token slot index slots [T] i32 (0 = base).
- `LoRAWeight(base, a, b)`: a layer's weight with its pairs attached, what the Projector receives in
  place of the plain weight (`with_lora`): the decoder layer's code does not change.

The formulation is the one-hot einsum over slots (sglang-jax's): u = x·A for every slot [T, S, P·R],
zeroed except the token's own slot, then each part's u_p·B_p summed over slots and rank. It reads
each slot's A/B once per step whatever the number of tokens, at the price of S times the delta's
FLOPs. Gathering each token's A[slot], B[slot] ([T, in, P·R] and [T, R, out_p]) materialises T
copies: measured on CPU for SmolLM2's wqkv (4 slots, rank 16, f32; `python bench/lora_step.py`,
2 shared cores), one-hot vs gather: T=64 0.33-0.39 vs 0.67-1.07 ms, T=512 0.9-1.3 vs 29-49 ms,
T=2048 2.7-4.6 vs 108-186 ms (the base [576, 960] matmul: 0.6, 1.8-3.1, 6.7-12 ms). Slot 0 (the
base) is an all-zero one-hot row, so it needs no storage: the arrays hold slots 1..S at 0..S-1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAPair:
    a: jax.Array  # [(L,) S, in..., P*R]
    b: tuple  # per fused part: [(L,) S, R, out_p...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """One layer's projection weight (an array or a QuantWeight) with its LoRA slots."""
    base: object
    a: jax.Array  # [S, in..., P*R]
    b: tuple  # per part [S, R, out_p...]

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


def lora_delta(spec: str, x: jax.Array, a: jax.Array, b: tuple, onehot: jax.Array, join=None) -> jax.Array:
    """The delta of `jnp.einsum(spec, x, w)` (spec: tokens first, the weight input-major, e.g.
    "thd,hde->te"): x [T, in...], a [S, in..., P*R], b P arrays [S, R, out_p...], onehot [T, S] →
    [T, out...]. `join(parts)`: the P part deltas [T, out_p...] → the fused output (P > 1)."""
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    ins = "".join(ch for ch in ws if ch in xs)
    outs = ws[len(ins):]
    t = xs[0]
    u = jnp.einsum(f"{xs},S{ins}R->{t}SR", x, a)  # [T, S, P*R]
    u = u * onehot[:, :, None]  # only the token's own slot survives
    R = u.shape[-1] // len(b)
    parts = [jnp.einsum(f"{t}SR,SR{outs}->{out}", u[..., p * R:(p + 1) * R], bp)  # [T, out_p...]
             for p, bp in enumerate(b)]
    return parts[0] if len(parts) == 1 else join(parts)
