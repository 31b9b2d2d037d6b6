"""Quantized expert weights (`--quantization int8|fp8|int4` on Mixtral / Qwen3-MoE): the matmuls of moe.py's
three expert paths when `we_gate_up` / `we_down` are QuantWeights (q [X, in, out] int8 / float8_e4m3fn,
or the uint8 bits of float8 where the chunked dot runs, jaxllm/models/quant_dot.py; scale [X, out] f32,
one per expert and output channel, `quant.quantize_experts`; or, an fp8 checkpoint's block-scaled experts
(checkpoints/hf_fp8.py), scale [X, in/B, out]: one per block of B inputs and output column). The router
stays full precision.

The per-output-channel scale commutes with the contraction, so each path computes
`dot(x, q converted to x's dtype) * scale[expert, col]` with f32 accumulation, then x's dtype:

- grouped: `ragged_dot` over the converted q; each row's scale is its expert's (rows are in expert
  order, so the scale rows are gathered by the sorted expert ids).
- gather: the routed experts' q gathered in 8 bits first ([T*k, in, out] s8), then converted: only
  T*k experts are ever widened.
- dense: every expert on every token, as a loop over the experts (`dense_loop`): each iteration
  slices one expert's q (8 bits), converts it and runs its two dots. The batched form (one
  "xte,xef->xtf" over the converted q) makes XLA CPU convert all experts into one full-precision
  copy per step, the loop one expert at a time (tests/models/test_moe_quant.py checks the temp bytes).

Block scales do not commute with the contraction: the expert weights are dequantized (q times each
block's scale, plus its offset for AWQ / GPTQ's asymmetric 4-bit, in f32, then x's dtype) into the dot's
operand instead. Block-scaled experts are an fp8 checkpoint's, `--quantization int4`'s (int4 q with
group scales [X, in/G, out], `quant.quantize_experts`; on the chunked-dot backend packed two a byte,
[X, in/2, out] uint8 in quant_pack4.py's byte order, unpacked here with a mask and a shift) and an AWQ /
GPTQ checkpoint's (checkpoints/hf_int4_experts.py: int4, or uint4 with offsets). Dequantized: for the dense loop one expert,
for gather the T*k routed ones, for grouped every expert of the layer (a full-precision copy per step
wherever the compiler does not fuse it into the grouped GEMM).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxllm.models.quant import QuantWeight
from jaxllm.models.quant_dot import FP8_BITS, fp8_bits_to_float
from jaxllm.models.quant_pack4 import nibbles


def operand(q: jax.Array, dtype) -> jax.Array:
    """An expert q (int8, float8_e4m3fn, or uint8 float8 bits) as `dtype` values, same shape."""
    if q.dtype == FP8_BITS:
        return fp8_bits_to_float(q, dtype)
    return q.astype(dtype)


def blocked(w: QuantWeight) -> bool:
    """Block scales ([X, in/B, out], scale.ndim == q.ndim) rather than per output channel ([X, out])."""
    return w.scale.ndim == w.q.ndim


def dequantize_blocks(w: QuantWeight, dtype) -> jax.Array:
    """A block-scaled expert weight (q [..., in, out], or packed two a byte [..., in/2, out]; scale and
    offset [..., in/B, out]) → the weight [..., in, out] in `dtype`: q times its block's scale (plus
    its offset: AWQ / GPTQ), in f32."""
    q, scale = w.q, w.scale
    nb, out = scale.shape[-2], q.shape[-1]
    lead = q.shape[:-2]
    if w.packed:  # byte j of block g: row g*B + j low, g*B + B/2 + j high (quant_pack4.py)
        lo, hi = nibbles(q, w.packed)  # [..., in/2, out] int8 / uint8 each
        half = (nb, q.shape[-2] // nb, out)
        v = jnp.concatenate([lo.reshape(lead + half), hi.reshape(lead + half)], axis=-2)  # [..., nb, B, out]
        v = v.astype(jnp.float32)
    else:
        v = operand(q, jnp.float32).reshape(lead + (nb, q.shape[-2] // nb, out))  # [..., nb, B, out]
    v = v * scale.astype(jnp.float32)[..., :, None, :]
    if w.offset is not None:
        v = v + w.offset.astype(jnp.float32)[..., :, None, :]
    return v.reshape(lead + (v.shape[-3] * v.shape[-2], out)).astype(dtype)


def grouped_dot(lhs: jax.Array, w: QuantWeight, group_sizes: jax.Array, row_expert: jax.Array) -> jax.Array:
    """lhs [R, in] in expert order, group_sizes [X], row_expert [R] (each row's expert) → [R, out] in lhs's dtype."""
    if blocked(w):
        return lax.ragged_dot(lhs, dequantize_blocks(w, lhs.dtype), group_sizes)  # [R, out]
    y = lax.ragged_dot(lhs, operand(w.q, lhs.dtype), group_sizes, preferred_element_type=jnp.float32)  # [R, out] f32
    return (y * w.scale[row_expert]).astype(lhs.dtype)


def gather_dot(spec: str, rows: jax.Array, w: QuantWeight, flat: jax.Array) -> jax.Array:
    """rows [R, in], flat [R] (each row's expert) → [R, out] in rows's dtype: the routed experts' q
    gathered in 8 bits ([R, in, out]; 4-bit packed: [R, in/2, out]), converted, one batched matvec,
    each row times its expert's scale."""
    if blocked(w):
        return jnp.einsum(spec, rows, dequantize_blocks(w[flat], rows.dtype))  # [R, out]
    y = jnp.einsum(spec, rows, operand(w.q[flat], rows.dtype), preferred_element_type=jnp.float32)  # [R, out] f32
    return (y * w.scale[flat]).astype(rows.dtype)


def dense_loop(x: jax.Array, combine: jax.Array, w_gate_up: QuantWeight | jax.Array,
               w_down: QuantWeight | jax.Array, swiglu: Callable[[jax.Array], jax.Array],
               hit: jax.Array | None = None) -> jax.Array:
    """x [T, E], combine [T, X] f32 (each token's routing weight per expert, 0 where not routed) →
    [T, E] f32: sum over experts e of combine[:, e] * down_e(swiglu(gate_up_e(x))), one expert per
    loop iteration (one expert's weights converted at a time); with `hit` [X] bool (moe.loop_experts)
    only the experts it marks run (`lax.cond`), the others are not read. Plain (unquantized) expert
    weights run the same loop (moe.loop_experts)."""
    X = w_gate_up.shape[0]

    def dot(a: jax.Array, w: QuantWeight | jax.Array, e) -> jax.Array:  # a [T, in] → [T, out] f32, expert e's
        if not isinstance(w, QuantWeight):
            return jnp.dot(a, lax.dynamic_index_in_dim(w, e, keepdims=False), preferred_element_type=jnp.float32)
        q = lax.dynamic_index_in_dim(w.q, e, keepdims=False)  # [in, out] 8-bit (4-bit packed: [in/2, out])
        if q.dtype == FP8_BITS:  # a contiguous u8 copy for the convert (quant_dot.FP8_CHUNK_COPY's reason)
            q = lax.optimization_barrier(q)
        s = lax.dynamic_index_in_dim(w.scale, e, keepdims=False)  # [out] or [in/B, out]
        if blocked(w):
            o = None if w.offset is None else lax.dynamic_index_in_dim(w.offset, e, keepdims=False)  # [in/B, out]
            one = QuantWeight(q, s, o, w.packed, w.pack_axis)
            return jnp.dot(a, dequantize_blocks(one, a.dtype), preferred_element_type=jnp.float32)
        return jnp.dot(a, operand(q, a.dtype), preferred_element_type=jnp.float32) * s

    def run(e, acc):  # acc [T, E] f32
        h = swiglu(dot(x, w_gate_up, e).astype(x.dtype))  # [T, F]
        y = dot(h, w_down, e)  # [T, E] f32
        return acc + y * lax.dynamic_index_in_dim(combine, e, axis=1)  # [T, 1] routing weight

    def body(e, acc):
        return run(e, acc) if hit is None else lax.cond(hit[e], lambda a: run(e, a), lambda a: a, acc)

    return lax.fori_loop(0, X, body, jnp.zeros(x.shape, jnp.float32))
