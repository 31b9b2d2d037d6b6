"""Full-precision (fp32 / bf16) projections of the CPU layer scan read in place at the traced layer.

In the "scan" layer loop (jaxllm/models/llama.py, the CPU default) each layer's weights are the
scan's xs: XLA slices them out of the stacked [L, ...] arrays and, before each dot, copies the
layer's slice into a buffer of its own (`dynamic-slice_bitcast_fusion = f32[576,3072]` etc.; for wo
a transposing `copy` until the projections contracted in layout order, leading_dot.py): every weight
byte read and written once more per step (bench/RESULTS.md, "Single-request decode latency vs HF"). XLA CPU cannot hand a dot a slice at a traced offset of a
buffer, so some copy stays; what this file changes is its size.

`stacked_dot` runs x @ w[layer] in a `fori_loop` over chunks of the weight's input rows (the
contracted axis): each iteration slices one contiguous [ch, N] block of about CHUNK_BYTES straight
out of the stacked [L, K, N] weight at the traced layer (XLA CPU still writes that block to a buffer
before the dot: a block-sized copy that stays in cache, not the layer's weight), dots it with x's
matching [T, ch] columns and adds the [T, N] partial to an f32 accumulator (a block is at most half
the weight, so the loop always runs). The stacked weight reaches the loop once (the Projector's in-place mechanism, jaxllm/models/projections.py, as for the
column-chunked quantized dot of quant_dot.py), so no weight-sized copy exists in the step.
Rows, not output columns: a row block is contiguous (a memcpy-like slice, no strided gather), and
measured faster than quant_dot's column chunks for f32 (a column-chunked variant: bench/RESULTS.md,
"fp32 projections read in place"). Gain measured on a 2-core EPYC for SmolLM2 fp32: 4-7% per decode
step quiet, more on a loaded host (a layer's 14 MiB slice fits the 32 MiB L3, so the copy was cheap).

Used for steps of at most MAX_TOKENS tokens (decode and small mixed steps; longer steps are
compute-bound and keep XLA's dot), on the CPU backend, one device (`layout` None), the scan loop;
$JAXLLM_CPU_STACKED_DOT switches it: "auto" (default) = on for those steps, "rows" = on for steps of
any size (to measure longer ones), "xla" = off (the scan's per-layer copy, as before).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax

ENV = "JAXLLM_CPU_STACKED_DOT"
MODES = ("auto", "rows", "xla")
MAX_TOKENS = 64  # steps of more tokens keep XLA's dot on the scan's slice (measured: bench/RESULTS.md)
# one [ch, N] row block at most (bench/stacked_dot.py; bench/RESULTS.md, "fp32 projections read in place"):
# 4 MiB was as fast as or faster than 1-2 MiB at T = 1..64; SmolLM2's weights then go in two halves
CHUNK_BYTES = 4 << 20
MIN_ROWS = 8


def mode() -> str:
    """$JAXLLM_CPU_STACKED_DOT, checked."""
    m = os.environ.get(ENV, "auto") or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r} is invalid: must be one of {', '.join(MODES)}")
    return m


def use_stacked_dot(num_tokens: int, layout) -> bool:
    """Whether a step of `num_tokens` tokens reads its full-precision stacked projections in place
    (the Projector, scan loop): the CPU backend, one device, and at most MAX_TOKENS tokens ("auto")
    or any number ("rows")."""
    m = mode()
    return (jax.default_backend() == "cpu" and layout is None
            and (m == "rows" or (m == "auto" and num_tokens <= MAX_TOKENS)))


def chunk_rows(k: int, n: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows per block of a [k, n] weight: about `chunk_bytes` of [ch, n] at `itemsize`, at least
    MIN_ROWS, at most k / 2 (never the whole weight, unless k < 2 * MIN_ROWS); the largest divisor
    of k not above that (no tail block: k is a model dimension, rich in small factors)."""
    if k < 2 * MIN_ROWS:
        return k
    rows = min(k // 2, max(MIN_ROWS, chunk_bytes // (itemsize * n)))
    while k % rows:
        rows -= 1
    return rows


def stacked_dot(x: jax.Array, w: jax.Array, layer, chunk_bytes: int | None = None) -> jax.Array:
    """x [T, K] @ w[layer] (w [L, K, N], `layer` a traced or Python int) → [T, N] f32, by blocks of
    K rows sliced from w at `layer` in place (accumulated in f32)."""
    t, k = x.shape
    n = w.shape[-1]
    if w.ndim != 3 or w.shape[1] != k:
        raise ValueError(f"stacked_dot: w must be [L, K={k}, N], got {tuple(w.shape)}")
    ch = chunk_rows(k, n, jnp.dtype(w.dtype).itemsize, chunk_bytes or CHUNK_BYTES)

    def block(i):  # [T, ch] @ [ch, N]: the block read straight out of layer `layer`
        wc = lax.dynamic_slice(w, (layer, i * ch, 0), (1, ch, n))[0]
        xc = lax.dynamic_slice_in_dim(x, i * ch, ch, axis=1)
        return jnp.dot(xc, wc, preferred_element_type=jnp.float32)

    if ch == k:
        return block(0)
    return lax.fori_loop(0, k // ch, lambda i, y: y + block(i), jnp.zeros((t, n), jnp.float32))


def stacked_einsum(x: jax.Array, w: jax.Array, layer) -> jax.Array:
    """`jnp.einsum(spec, x, w[layer])` for x [T, in...] contracting all its axes but the first with
    w's leading ones after the layer axis (w [L, in..., out...]) → [T, out...] in x's and w's dtype."""
    nc = x.ndim - 1
    ins, outs = w.shape[1:1 + nc], w.shape[1 + nc:]
    if tuple(x.shape[1:]) != tuple(ins):
        raise ValueError(f"stacked_einsum: x {tuple(x.shape)} does not match w {tuple(w.shape)}'s inputs")
    k, n = math.prod(ins), math.prod(outs)
    y = stacked_dot(x.reshape(x.shape[0], k), w.reshape(w.shape[0], k, n), layer)  # [T, N] f32
    return y.astype(jnp.result_type(x.dtype, w.dtype)).reshape((x.shape[0],) + tuple(outs))
