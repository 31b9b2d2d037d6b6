"""fp8 KV cache: float8_e4m3fn pages with one f32 scale per layer and kv head for each of K and V.

Scheme (per layer, per kv head, symmetric): element x of an fp8 page (stored as its uint8 bits,
see STORAGE) stands for
`x * scale[layer, head]`. Writes quantize `clip(row / scale, -448, 448)` to e4m3 (448 is its
largest finite value; a plain cast would turn an overflow into NaN, e4m3fn has no inf); the
attention kernels and the reference read fp8, multiply the QK logits by the K scale and the
P @ V output by the V scale inside the kernel (both are per kv head, so they factor out of the
dots exactly).

Where the scales come from. The engine sets them once at start, before any request, so a
request's output never depends on what the server saw first (jaxllm/runner/kv_calibration.py):
- `calculate_kv_scales=True` (default; vLLM's flag name, `--[no-]calculate-kv-scales`): one fixed
  calibration prefill (the Zen of Python through the model's tokenizer, or seeded ids for a model
  without one) runs through the model into a private cache in the model dtype, and each layer's
  kv head gets `amax_scale(absmax)` = HEADROOM * absmax / 448 of its K / V rows there;
- `calculate_kv_scales=False`: every scale 1.0, vLLM's uncalibrated default (checkpoint-provided
  scales are not read yet).
HEADROOM = 64 lets values grow to 64x the calibration's largest before they clip (SmolLM2's V grew
to 11x its first token's), while e4m3's normal range (2^-6 .. 448) still covers values down to
absmax / 448 at full (3-bit mantissa) relative precision: the headroom costs nothing to values in
range, e4m3's relative step is the same across its normal range. Why calibrate rather than 1.0: as
accurate on SmolLM2 (|K| <= 21, |V| <= 17), but 1.0 clips a model whose K reaches 448 and drops
small-valued heads into subnormals; a derived scale follows the model.

The kernel-level fallback (a raw `KVCache.zeros(..., fp8)` whose scales are 0 = "not set", used by
tests and bench/perplexity.py's "first"): the first write to a layer sets each kv head's scale to
HEADROOM x absmax / 448 of the rows it writes (`first_write_scale`), fixed after. An engine from
build_engine never leaves a scale at 0. bench/perplexity.py --kv-scale compares calibrated, first-write and fixed
scales (bench/RESULTS.md, "fp8 KV cache" and "fp8 KV scales calibrated at start").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The pages' array dtype: uint8 holding e4m3fn bits. XLA's CPU backend has no fp8 scatter or gather:
# its float normalization converts the WHOLE cache array to f16 and back around each write and
# read, and a bitcast of the whole array to uint8 is a copy there too (measured: write_kv into a
# 2 x 16384-block cache took 129 ms instead of 0.14 ms; a tiny model's engine step ~10 s). Only
# gathered or written rows are bitcast (`to_storage` / `from_storage`); the Triton kernels bitcast
# each loaded [block_k, head_dim] tile in registers.
STORAGE = jnp.uint8
HEADROOM = 64.0


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8)


def amax_scale(amax: jax.Array) -> jax.Array:
    """amax [...] f32 (the largest |K| or |V| seen) → the scale that maps it to 448 / HEADROOM."""
    return amax * (HEADROOM / FP8_MAX)


def first_write_scale(current: jax.Array, rows: jax.Array, valid: jax.Array) -> jax.Array:
    """current [kvh] f32 (0 = unset), rows [T, kvh, d], valid [T] bool → the scale [kvh] f32 to
    write with: `current` where set, else HEADROOM x absmax of the valid rows / 448 (0 while a
    layer has seen no non-zero row)."""
    a = jnp.where(valid[:, None, None], jnp.abs(rows.astype(jnp.float32)), 0.0)  # [T, kvh, d] f32
    amax = jnp.max(a, axis=(0, 2)) if rows.shape[0] else jnp.zeros(rows.shape[1], jnp.float32)  # [kvh]
    return jnp.where(current > 0, current, amax_scale(amax))


def quantize_rows(rows: jax.Array, scale: jax.Array) -> jax.Array:
    """rows [T, kvh, d] float, scale [kvh] f32 → [T, kvh, d] float8_e4m3fn (saturating)."""
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)  # [kvh] f32
    x = rows.astype(jnp.float32) * inv[None, :, None]
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def to_storage(x: jax.Array) -> jax.Array:
    """float8_e4m3fn → the uint8 array holding its bits (what an fp8 cache's pages store)."""
    return jax.lax.bitcast_convert_type(x, STORAGE)


def from_storage(x: jax.Array) -> jax.Array:
    """uint8 bits of an fp8 cache's pages (gathered rows, never the whole cache) → float8_e4m3fn."""
    return jax.lax.bitcast_convert_type(x, FP8)


def from_storage_as(x: jax.Array, dtype) -> jax.Array:
    """`x` in `dtype`, uint8 storage (float8_e4m3fn bits: an fp8 cache's pages, an fp8 weight held as
    bits) bitcast to float8_e4m3fn first. Works on a tile loaded in a Triton kernel (converted in
    registers) as on a jnp array."""
    if x.dtype == STORAGE:
        x = jax.lax.bitcast_convert_type(x, FP8)
    return x.astype(dtype)


def dequantize_pages(pages: jax.Array, scale: jax.Array) -> jax.Array:
    """pages [..., kvh, d] uint8 (fp8 bits), scale [kvh] f32 → f32 (tests and brute-force references)."""
    return from_storage(pages).astype(jnp.float32) * scale[:, None]
