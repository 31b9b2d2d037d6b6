"""The quantized matmul in output-column chunks, so no full-precision copy of a weight exists (issue 17).

XLA CPU converts an int8/fp8 dot operand to the activation dtype in a fusion of its own before the
dot: `einsum(x, q.astype(f32))` materialises the whole layer weight in f32 every step (4x the int8
bytes written and read again; bench/RESULTS.md, "Where the int8 weight is converted"). No XLA CPU
flag of jax 0.11.2 changes that (XNNPACK/YNNPACK/oneDNN library fusions: checked, same convert).

`chunked_quant_dot` runs the dot in a `fori_loop` over chunks of the weight's output columns: each
iteration converts (and, for block scales, scales) one [K, ch] chunk of about CHUNK_BYTES in the
activation dtype (512 KiB, in L2; 4x that for steps of 32+ tokens, whose dots want wider chunks),
and writes its [T, ch] slice of the output in place. The temporary is one chunk, not the weight;
the s8/f8 weight is read once. In the layer scan, chunks are sliced from the stacked [L, K, N]
weight at the traced layer (`layer`): slicing the layer first made XLA copy it (s8) every step.

float8_e4m3fn weights are held as their uint8 bits on this path (`holds_fp8_bits`: `quantize(...,
fp8_bits=True)` at load, jaxllm/models/llama.py) and each chunk converts its slice of bits to the
activation dtype with integer ops (`fp8_bits_to_float`, FP8_CONVERT "bits": XLA CPU emulates a
float8 -> f32 convert per element in software) after copying the slice out (FP8_CHUNK_COPY: a
dynamic-slice fused into the convert made that fusion 3-4x slower than the same convert of a
contiguous chunk; the copy is one u8 chunk). SmolLM2 fp8 step at T=1: 60 -> 40 ms, int8 26
(bench/RESULTS.md, "fp8 bits converted with integer ops"). Two XLA CPU behaviours make that necessary: it widens a float8 operand of a while loop
(the layer scan, the chunk loop) to f16 whole, before the loop (a 2-byte copy of every fp8 weight
per step, 211 MiB for SmolLM2-135M), and it runs a float8 -> uint8 `bitcast_convert_type` of a whole
weight as a loop fusion writing a new u8 array (`%wrapped_bitcast-convert = u8[30,576,3072]
fusion(param)`), not as a free bitcast: converting at trace time (`fp8_as_bits`, still the fallback
for a float8 q) cost a 1-byte copy of every fp8 weight per step (106 MiB). A uint8 `q` here means
float8_e4m3fn bits.

Used on the CPU backend on one device (`use_chunked`, read by jaxllm/models/projections.py);
elsewhere `quant_einsum` keeps the plain dot (a GPU compiler may fuse the convert into the GEMM; the
column loop would also fight a sharded output axis).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from jaxllm.gpu_defaults import gpu_default
from jaxllm.models.quant_pack4 import nibbles, split_halves

ENABLED = True  # read when a step is traced; bench/quant.py sets it False to measure the plain dot
HOLD_FP8_BITS = True  # read at load; bench/quant.py sets it False ("fp8-f8") to measure the per-step bitcast copy
CHUNK_BYTES = 512 * 1024  # one converted chunk [K, ch] in the activation dtype (bench/RESULTS.md, "chunked")
WIDE_FROM_T, WIDE_FACTOR = 32, 4  # steps of >= 32 tokens: 4x wider chunks (2 MiB; each chunk's dot is larger)
MIN_COLS = 64  # narrower column chunks make the per-chunk dot inefficient
FP8_CONVERT = "bits"  # read at trace time: "bits" | "lut" | "astype" (fp8_bits_to_float; bench/quant_step.py)
PACK_INT4 = True  # read at load: 4-bit q held as uint8 two values a byte (quant_pack4.py); bench/quant.py "int4-xla" sets it False
FP8_CHUNK_COPY = True  # read at trace time: copy each u8 loop chunk out before converting it (chunked_quant_dot)
PACK4_ONE_DOT_FROM_T = 32  # read at trace time: packed 4-bit chunks of steps of >= this many tokens meet x in one
# [T, K] x [K, c] dot (x's halves concatenated once per step), not two [T, K/2] ones summed; None: always two
# (bench/RESULTS.md, "4-bit steps on CPU": the SmolLM2 T=64 step 1.18x fp32's with two dots)


FP8_BITS = jnp.uint8  # a q of this dtype holds float8_e4m3fn bits
QUANT_ENV = "JAXLLM_QUANT_MATMUL"  # auto (the Pallas quant_matmul on GPUs) | pallas | xla


def pallas_quant_matmul(platform: str | None = None) -> bool:
    """Whether quantized projections of decode-sized steps may run the Pallas quant_matmul
    (pallas_kernels/matmul/quant.py; jaxllm/models/projections.py): $JAXLLM_QUANT_MATMUL, "auto" = on GPUs."""
    return gpu_default(QUANT_ENV, ("auto", "pallas", "xla"), "pallas", platform or jax.default_backend())


def use_chunked(layout) -> bool:
    """Whether quantized projections run the chunked dot: the CPU backend, one device (`layout` None)."""
    return ENABLED and jax.default_backend() == "cpu" and layout is None


def holds_fp8_bits(layout) -> bool:
    """Whether an fp8 weight is held as its uint8 bits from load on: wherever the chunked dot runs
    (XLA CPU copies a whole-weight float8 -> uint8 bitcast every step, see above). Elsewhere (GPU,
    tensor parallel) q stays float8_e4m3fn, the dtype the plain dot hands the backend's gemm."""
    return HOLD_FP8_BITS and use_chunked(layout)


def packs_int4(layout) -> bool:
    """Whether a 4-bit weight is held packed two values a byte in uint8 from load on (quant_pack4.py):
    wherever the chunked dot runs (XLA CPU's int4 / uint4 → f32 convert costs ~3x int8's; the
    bytes unpack with a mask and a shift). Elsewhere q stays XLA's int4 / uint4 (but see
    `packs_int4_projections`)."""
    return PACK_INT4 and use_chunked(layout)


def packs_int4_projections(layout) -> bool:
    """Whether a 4-bit *projection* weight (not an expert's) is held packed: as `packs_int4`, and also
    where the Pallas quant_matmul runs (one device, `pallas_quant_matmul`), which reads the bytes."""
    return packs_int4(layout) or (PACK_INT4 and layout is None and pallas_quant_matmul())


def fp8_as_bits(tree):
    """Every float8_e4m3fn array in `tree` (QuantWeight.q of a stacked or per-layer weight) bitcast to
    its uint8 bits; other leaves unchanged. Undone per chunk in chunked_quant_dot. Under jit on XLA
    CPU this is a copy of the array (a loop fusion), so the model holds fp8 as bits instead
    (`holds_fp8_bits`); here it is the fallback for a float8 q (quantized without fp8_bits=True)."""
    def bits(a):
        return lax.bitcast_convert_type(a, FP8_BITS) if a.dtype == jnp.float8_e4m3fn else a
    return jax.tree.map(bits, tree)


def fp8_bits_to_float(b: jax.Array, dtype, how: str | None = None) -> jax.Array:
    """b (uint8 bits of float8_e4m3fn) → the same values in `dtype`, by `how` (FP8_CONVERT if None):
    "astype": bitcast to float8 and convert (XLA CPU emulates that per element in software);
    "bits": the f32 bits built with integer ops (XLA CPU flushes f32 subnormals, so no 2^120 rescale
    of the 7 low bits): a normal code (exponent e > 0, mantissa m) is exponent e + 120, mantissa m
    at bits 20..22; a subnormal one (e == 0) is m * 2^-9 from an int → f32 convert; 0x7F → NaN; the
    sign bit moved to bit 31;
    "lut": a gather from the [256] f32 table of every code's value."""
    how = how or FP8_CONVERT
    if how == "astype":
        return lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(dtype)
    if how == "lut":
        table = jnp.asarray(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))  # [256]
        return jnp.take(table, b.astype(jnp.int32), axis=0).astype(dtype)
    if how != "bits":
        raise ValueError(f"FP8_CONVERT={how!r}: expected 'astype', 'bits' or 'lut'")
    w = b.astype(jnp.uint32)  # same shape as b
    mag = w & 0x7F
    sub = lax.bitcast_convert_type(mag.astype(jnp.float32) * jnp.float32(2.0 ** -9), jnp.uint32)  # e == 0
    bits = jnp.where(mag < 8, sub, (mag << 20) + (120 << 23))
    bits = jnp.where(mag == 0x7F, jnp.uint32(0x7FC00000), bits)
    return lax.bitcast_convert_type(bits | ((w & 0x80) << 24), jnp.float32).astype(dtype)


def chunk_cols(k: int, n: int, itemsize: int = 4, chunk_bytes: int | None = None) -> int:
    """Columns per chunk for a [k, n] weight: about `chunk_bytes` of [k, ch] at `itemsize`, at least
    MIN_COLS, at most n / 2 (never the whole weight, unless n < 2 * MIN_COLS); a divisor of n in
    [cols/2, cols] when one exists (no tail chunk)."""
    if n < 2 * MIN_COLS:
        return n
    cols = min(n // 2, max(MIN_COLS, (chunk_bytes or CHUNK_BYTES) // (itemsize * k)))
    for d in range(cols, max(cols // 2, 1) - 1, -1):
        if n % d == 0:
            return d
    return cols


def chunked_quant_dot(x: jax.Array, q: jax.Array, scale: jax.Array, block: int | None = None,
                      chunk_bytes: int | None = None, layer=None, offset: jax.Array | None = None,
                      packed: str | None = None) -> jax.Array:
    """x [T, K] float, q [K, N] int8/int4/uint4/float8_e4m3fn (or its uint8 bits), scale [N] (per
    output channel) or [K/block, N] (block scales along K) → [T, N] f32 = x @ dequantize(q, scale),
    computed chunk by chunk of N. `offset` [K/block, N] (block scales only): each chunk's weight is
    scale * q + offset (GGUF Q4_1 / AWQ / GPTQ). `layer` (an int or traced int32): q [L, K, N] and
    scale [L, ...] (and offset) are stacked and each chunk is sliced out of layer `layer` directly
    (no copy of the layer's slice). `packed` ("int4" / "uint4", block scales only): q is [K/2, N]
    uint8 holding two such values a byte (quant_pack4.py); each chunk's low and high rows are
    scaled alone and meet x's matching halves in two [T, K/2] x [K/2, c] dots (no re-interleave), or, for
    steps of PACK4_ONE_DOT_FROM_T+ tokens, stacked into one [K, c] that x's halves side by side meet in one dot."""
    t, k = x.shape[0], x.shape[1]
    n = q.shape[-1]
    if chunk_bytes is None:  # measured on SmolLM2 shapes (bench/RESULTS.md): 512 KiB best at T=1, 2 MiB at T=64..256
        chunk_bytes = CHUNK_BYTES * (WIDE_FACTOR if t >= WIDE_FROM_T else 1)
    q = fp8_as_bits(q)  # [K, N] int8, or uint8 bits of float8_e4m3fn (a no-op for the bits the model holds)
    ch = chunk_cols(k, n, jnp.dtype(x.dtype).itemsize, chunk_bytes)
    nfull = n // ch
    if packed:
        if block is None or q.shape[-2] * 2 != k:
            raise ValueError(f"packed={packed!r}: needs block scales and q [K/2, N] = [{k // 2}, {n}], "
                             f"got block={block}, q {tuple(q.shape)}")
        x_lo, x_hi = split_halves(x, block)  # [T, K/2] each: the rows held in the low / high nibbles
        one_dot = PACK4_ONE_DOT_FROM_T is not None and t >= PACK4_ONE_DOT_FROM_T
        if one_dot:  # [T, K]: the low rows' inputs, then the high rows', matching each chunk's stacked halves
            x_cat = jnp.concatenate([x_lo, x_hi], axis=1)

    def part4(qc: jax.Array, sc: jax.Array, oc: jax.Array | None) -> jax.Array:
        """One packed chunk: qc [K/2, c] uint8, sc / oc [K/block, c] → [T, c] f32. Steps of a few tokens
        dot each half alone (no [K, c] concatenate); longer ones dot the two halves stacked, once."""
        c = qc.shape[1]
        halves = []
        for vh in nibbles(qc, packed):  # vh [K/2, c] int8 / uint8 values
            w = vh.reshape(k // block, block // 2, c).astype(jnp.float32) * sc.astype(jnp.float32)[:, None, :]
            if oc is not None:  # scale * q + offset, as the unpacked path computes it
                w = w + oc.astype(jnp.float32)[:, None, :]
            halves.append(w.reshape(k // 2, c).astype(x.dtype))  # [K/2, c]
        if one_dot:
            return jnp.dot(x_cat, jnp.concatenate(halves, axis=0), preferred_element_type=jnp.float32)  # [T, c]
        return (jnp.dot(x_lo, halves[0], preferred_element_type=jnp.float32)
                + jnp.dot(x_hi, halves[1], preferred_element_type=jnp.float32))  # [T, c]

    def part(qc: jax.Array, sc: jax.Array, oc: jax.Array | None, copy: bool = True) -> jax.Array:
        """One chunk: qc [K, c], sc [c] or [K/block, c], oc None or [K/block, c] → [T, c] f32.
        `copy`: qc is a chunk, not the whole weight (whose copy the barrier would make)."""
        if packed:
            return part4(qc, sc, oc)
        if qc.dtype == FP8_BITS:
            if FP8_CHUNK_COPY and copy:  # the slice its own fusion: a contiguous u8 [K, c] the convert reads
                qc = lax.optimization_barrier(qc)
            qc = fp8_bits_to_float(qc, x.dtype if block is None else jnp.float32)
        if block is None:
            return jnp.dot(x, qc.astype(x.dtype), preferred_element_type=jnp.float32) * sc.astype(jnp.float32)
        c = qc.shape[1]
        w = (qc.reshape(k // block, block, c).astype(jnp.float32) * sc.astype(jnp.float32)[:, None, :])
        if oc is not None:  # [K/block, B, c] f32: scale * q + offset, the order GGUF Q4_1's dequantization uses
            w = w + oc.astype(jnp.float32)[:, None, :]
        return jnp.dot(x, w.reshape(k, c).astype(x.dtype), preferred_element_type=jnp.float32)  # [T, c]

    def cols(a: jax.Array, start, width: int) -> jax.Array:
        """Columns [start, start + width) of a [..., N] (of its layer `layer` when stacked)."""
        if layer is None:
            return lax.dynamic_slice_in_dim(a, start, width, axis=a.ndim - 1)
        starts = (layer,) + (0,) * (a.ndim - 2) + (start,)
        return lax.dynamic_slice(a, starts, (1,) + a.shape[1:-1] + (width,))[0]

    def chunk(start, width: int, copy: bool = True) -> jax.Array:
        oc = None if offset is None else cols(offset, start, width)
        return part(cols(q, start, width), cols(scale, start, width), oc, copy)

    def body(i, y):  # y [T, N] f32, written in place chunk by chunk
        return lax.dynamic_update_slice_in_dim(y, chunk(i * ch, ch), i * ch, axis=1)

    if nfull <= 1 and ch == n:
        return chunk(0, n, copy=False)
    y = lax.fori_loop(0, nfull, body, jnp.zeros((t, n), jnp.float32))  # [T, N] f32
    if nfull * ch < n:  # the tail chunk, static
        tail = n - nfull * ch
        y = y.at[:, nfull * ch:].set(chunk(nfull * ch, tail))
    return y


def flat_quant(q: jax.Array, scale: jax.Array, offset: jax.Array | None, nc: int, stacked: bool,
               packed: str | None = None):
    """A quantized weight as the matrix a dot contracting x's `nc` axes after its tokens axis reads:
    q [(L,) in..., out...] (`packed`: its last contracted axis holds two rows a byte), scale [(L,) out...]
    or block scales along the last contracted axis [(L,) in..., in_last/B, out...] (and an offset like
    them) → (q2 [(L,) K, N] ([(L,) K/2, N] packed), s2 [(L,) N] or [(L,) K/B, N], o2 like s2 or None,
    K, B (None: per-column scales), the output axes out...). Shared by the chunked dot (quant_dot_flat)
    and the Pallas quant_matmul's caller (projections.py)."""
    lead = q.shape[:1] if stacked else ()
    qs = q.shape[len(lead):]
    if packed:  # the weight's own shape: the packed (last contracted) axis holds two rows a byte
        qs = qs[:nc - 1] + (qs[nc - 1] * 2,) + qs[nc:]
    out_shape = qs[nc:]
    k, n = math.prod(qs[:nc]), math.prod(out_shape)
    o2 = None
    if scale.ndim == q.ndim:  # block scales along the last contracted axis: K/B rows of scales
        block = qs[nc - 1] // scale.shape[len(lead) + nc - 1]
        s2 = scale.reshape(lead + (-1, n))
        o2 = None if offset is None else offset.reshape(s2.shape)
    else:
        block, s2 = None, scale.reshape(lead + (n,))
    q2 = q.reshape(lead + ((k // 2 if packed else k), n))  # [(L,) K, N], or [(L,) K/2, N] packed
    return q2, s2, o2, k, block, out_shape


def quant_dot_flat(x: jax.Array, q: jax.Array, scale: jax.Array, chunk_bytes: int | None = None,
                   layer=None, offset: jax.Array | None = None, packed: str | None = None) -> jax.Array:
    """`einsum(x, dequantize(QuantWeight(q, scale)))` for x [T, in...] contracting all its axes but
    the first with q's leading ones (q [in..., out...]; scale [out...] or block scales
    [in..., in_last/B, out...], and an `offset` of the block scales' shape) → [T, out...] f32, through `chunked_quant_dot` on flattened views.
    `layer`: q and scale carry a leading [L] axis and layer `layer` is used, read in place.
    `packed`: q is uint8 holding two 4-bit values a byte along its last contracted axis (quant_pack4.py)."""
    q2, s2, o2, k, block, out_shape = flat_quant(q, scale, offset, x.ndim - 1, layer is not None, packed)
    y = chunked_quant_dot(x.reshape(x.shape[0], k), q2, s2, block, chunk_bytes, layer, o2, packed)  # [T, N] f32
    return y.reshape((x.shape[0],) + out_shape)
