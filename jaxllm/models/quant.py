"""Weight-only quantization of the per-layer projections: `QuantWeight(q, scale)`.

`--quantization int8|fp8` quantizes the four held per-layer projection weights (fused "wqkv" and
"w_gate_up", "wo", "w_down": the seven projections of a Llama layer) at load, from whatever
full-precision checkpoint was loaded; embeddings, the LM head, norms and biases stay in the model
dtype. Symmetric, one scale per output channel (absmax over the contracted axes):

    int8: q = round(w / s) in [-127, 127],           s = absmax / 127
    fp8:  q = (w / s).astype(float8_e4m3fn),         s = absmax / 448 * 2^(k/8), k = 0..7 searched
                                                      per channel for the least squared error

The held weights are input-major (`[in..., out...]`, the contracted axes lead, see llama.py), so
`scale` has the weight's output axes only: `[out...]` per layer, `[L, out...]` stacked, and is
sharded like the weight's output axes (`scale_axes`). The matmul is `einsum(x, q.astype(x.dtype))`
then `* scale` on the [T, out...] result (the scale is per output channel, so it commutes with the
contraction): the weight's bytes are read in 8 bits. XLA CPU materialises a converted copy of the
whole weight before a dot, so on CPU (one device) the dot runs in output-column chunks instead
(jaxllm/models/quant_dot.py: the converted temporary is one chunk); elsewhere whether the compiler
converts inside the dot is backend-dependent (bench/RESULTS.md, "Quantized weights"). Where the
chunked dot runs, an fp8 `q` is held as its uint8 bits (quant_dot.py: XLA CPU copies float8 weights
per step otherwise); `QuantWeight.method` and `fp8_view` read it as float8_e4m3fn again.

4-bit (`--quantization int4`, `quantize_int4`; or a 4-bit checkpoint's own weights): int4 / uint4 q
with group (block) scales along the last contracted axis, held on the chunked-dot path as uint8
two values a byte (`QuantWeight.packed`, jaxllm/models/quant_pack4.py).

Hand-written rather than Qwix's `QArray`: with float activations and a quantized weight Qwix's
`einsum` takes its `_slow_dot_general` path, which dequantizes the whole weight (convert and
scale-multiply over [in, out]) before the dot; here the scale multiplies the small [T, out] output.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.config import QUANTIZATIONS as QUANT_METHODS  # one list for the config and the model
from jaxllm.models.leading_dot import leading_dot
from jaxllm.models.quant_dot import FP8_BITS, quant_dot_flat
from jaxllm.models.quant_pack4 import can_pack, pack4, unpack4

# held name -> the number of contracted (input) axes after the "layers" axis
QUANT_PARAMS: dict[str, int] = {"layers.wqkv": 1, "layers.wo": 2, "layers.w_gate_up": 1, "layers.w_down": 1}
_QMAX = {"int8": 127.0, "fp8": 448.0}
FP8_SCALE_SEARCH = 8  # candidate fp8 scales per output channel (see `quantize`)


INT4_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def is_int4(dtype) -> bool:
    """int4 / uint4: XLA stores these packed, two a byte (bench/RESULTS.md, "4-bit weights")."""
    return jnp.dtype(dtype) in INT4_DTYPES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """q: the weight's shape in int8 / float8_e4m3fn (or uint8 holding float8_e4m3fn bits, on the
    chunked-dot path: `quantize(..., fp8_bits=True)`) or 4-bit int4 / uint4; scale: f32, q's output
    axes only (`[out...]`, or `[L, out...]` when q is stacked `[L, in..., out...]`), or block (group)
    scales (f32 or f16) along the last contracted axis (`[in..., in_last/B, out...]`: q's shape with
    that axis divided by the block size B; a GGUF Q8_0 / Q4 checkpoint kept quantized, B = 32; an
    AWQ / GPTQ group): then scale.ndim == q.ndim. offset: None, or (asymmetric 4-bit formats: GGUF
    Q4_1's min, AWQ / GPTQ's -scale * zero) the block scales' shape, the weight being
    `scale * q + offset` per block (4-bit weights always have block scales)."""
    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None = None
    # static: "int4" / "uint4" when q is uint8 holding two such values a byte along `pack_axis`
    # (negative: counted from the end), the chunked dot's 4-bit form (jaxllm/models/quant_pack4.py)
    packed: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    pack_axis: int = dataclasses.field(default=-2, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (a packed q's packed axis counted twice)."""
        s = list(self.q.shape)
        if self.packed:
            s[self.pack_axis] *= 2
        return tuple(s)

    @property
    def method(self) -> str:
        """"int8", "int4" (int4 / uint4, or packed two a byte) or "fp8" (float8_e4m3fn values, or their uint8 bits)."""
        if self.packed or is_int4(self.q.dtype):
            return "int4"
        return "int8" if jnp.dtype(self.q.dtype) == jnp.int8 else "fp8"

    @property
    def bits(self) -> int:
        """Bits per weight value of q: 4 or 8."""
        return 4 if self.method == "int4" else 8

    @property
    def nbytes(self) -> int:
        """Stored bytes: a 4-bit q is packed two values a byte (numpy's int4 takes a byte each; XLA's
        device buffers are packed: `on_device_size_in_bytes`; a `packed` q is bytes already)."""
        qb = (int(self.q.size) + 1) // 2 if is_int4(self.q.dtype) else int(self.q.nbytes)
        return qb + int(self.scale.nbytes) + (0 if self.offset is None else int(self.offset.nbytes))

    def __getitem__(self, i) -> "QuantWeight":
        """Layer i of a stacked weight (the scale's and offset's leading axis is the layer axis too)."""
        return QuantWeight(self.q[i], self.scale[i], None if self.offset is None else self.offset[i],
                           self.packed, self.pack_axis)

    def unpacked(self, xp=jnp) -> "QuantWeight":
        """The same weight with an int4 / uint4 q (a packed one unpacked; `xp`: jax.numpy or numpy)."""
        if not self.packed:
            return self
        nb = self.scale.shape[self.pack_axis]
        return QuantWeight(unpack4(self.q, self.packed, self.pack_axis, nb, xp), self.scale, self.offset)


def check_method(quantization) -> None:
    if quantization is not None and quantization not in QUANT_METHODS:
        raise ValueError(f"quantization={quantization!r} is invalid: must be one of {list(QUANT_METHODS)} or None")


def check_backend(quantization, backend: str | None = None) -> None:
    """fp8 needs float8_e4m3fn arrays and converts on the backend; ValueError naming it otherwise."""
    if quantization != "fp8":
        return
    backend = backend or jax.default_backend()
    try:
        x = jnp.ones((2,), jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32)
        jax.block_until_ready(x)
    except Exception as e:  # noqa: BLE001 - any backend refusal becomes the one-line error below
        raise ValueError(f"quantization='fp8' is not supported on the {backend} backend "
                         f"(float8_e4m3fn: {type(e).__name__}); use quantization='int8'") from None


def fp8_view(q, xp=jnp):
    """q as its values' dtype: uint8 bits (`FP8_BITS`) → float8_e4m3fn (a bitcast; `xp`: jax.numpy or
    numpy), int8 / float8_e4m3fn unchanged."""
    if q.dtype != FP8_BITS:
        return q
    if xp is jnp:
        return jax.lax.bitcast_convert_type(q, jnp.float8_e4m3fn)
    return q.view(jnp.dtype(jnp.float8_e4m3fn))  # numpy: ml_dtypes' float8_e4m3fn


INT4_GROUP = 128  # `--quantization int4`: scales per group of 128 along the last contracted axis (see int4_group)


def int4_group(k_last: int) -> int:
    """The group size of `--quantization int4` along a last contracted axis of `k_last`: INT4_GROUP
    when it divides the axis, else the largest even divisor of the axis below it (SmolLM2's hidden
    576: 96; a head_dim of 64: 64, one group per head), else the whole axis (per output channel
    within the leading contracted axes)."""
    if k_last % INT4_GROUP == 0:
        return INT4_GROUP
    for g in range(min(INT4_GROUP, k_last), 1, -1):
        if k_last % g == 0 and g % 2 == 0:
            return g
    return k_last


def quantize_int4(w: jax.Array, num_contracted: int, stacked: bool = False) -> QuantWeight:
    """Round to nearest, symmetric: per group of `int4_group(K_last)` inputs along the last contracted
    axis and output channel, s = absmax / 7, q = round(w / s) in [-7, 7] as int4; scale f32
    [(L,) in..., in_last/g, out...] (block scales, QuantWeight's 4-bit form, like a symmetric GPTQ's)."""
    lead = 1 if stacked else 0
    a = lead + num_contracted - 1  # the last contracted axis
    k = w.shape[a]
    g = int4_group(k)
    wf = w.astype(jnp.float32).reshape(w.shape[:a] + (k // g, g) + w.shape[a + 1:])  # [(L,) in.., nb, g, out..]
    amax = jnp.max(jnp.abs(wf), axis=a + 1)  # [(L,) in.., nb, out..] f32
    scale = jnp.where(amax > 0, amax / 7.0, 1.0)
    q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, a + 1)), -7, 7).astype(jnp.int4).reshape(w.shape)
    return QuantWeight(q, scale)


def quantize(w: jax.Array, method: str, num_contracted: int, stacked: bool = False,
             fp8_bits: bool = False, pack4: bool = False) -> QuantWeight:
    """w [(L,) in..., out...] float → QuantWeight; `num_contracted` input axes after the optional
    leading layer axis. Jit-compatible (layout.py runs it under jit with out_shardings). `fp8_bits`:
    an fp8 q is returned as its uint8 bits (the chunked dot's held form, quant_dot.holds_fp8_bits);
    `pack4`: an int4 q is returned packed two a byte (quant_dot.packs_int4). int4: `quantize_int4`.

    fp8: the per-channel scale is searched, not just absmax / 448: e4m3's relative error (3 mantissa
    bits) does not depend on the scale, but which weights land near a grid point does; of
    absmax / 448 * 2^(k/8), k = 0..7 (never clipping), each output channel keeps the scale with the
    least squared error. That cuts SmolLM2's fp8 weight error 0.0262 -> 0.0247 (relative RMS) and
    the perplexity cost +2.8% -> +1.2% on the held text (bench/RESULTS.md, "Quantized weights")."""
    if method == "int4":
        qw = quantize_int4(w, num_contracted, stacked)
        return pack_int4(qw) if pack4 else qw
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + num_contracted))
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axes)  # [(L,) out...] f32
    scale = jnp.where(amax > 0, amax / _QMAX[method], 1.0)  # [(L,) out...] f32
    if method == "int8":
        q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, axes)), -127, 127).astype(jnp.int8)
        return QuantWeight(q, scale)
    best_s, best_err = scale, None
    for k in range(FP8_SCALE_SEARCH):
        s = scale * 2.0 ** (k / FP8_SCALE_SEARCH)  # [(L,) out...]
        se = jnp.expand_dims(s, axes)
        d = jnp.clip(wf / se, -448.0, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32) * se
        err = jnp.sum((d - wf) ** 2, axis=axes)  # [(L,) out...]
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_s, best_err = jnp.where(better, s, best_s), jnp.where(better, err, best_err)
    q = jnp.clip(wf / jnp.expand_dims(best_s, axes), -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return QuantWeight(jax.lax.bitcast_convert_type(q, FP8_BITS) if fp8_bits else q, best_s)


# the experts' weights (jaxllm/models/moe.py), [L, X, in, out]: one contracted axis after the "layers" and
# "experts" axes, so their own quantizer (`quantize_experts`) and scale axes (`expert_scale_axes`)
EXPERT_QUANT_PARAMS = ("layers.we_gate_up", "layers.we_down")


def quantize_experts(w: jax.Array, method: str, fp8_bits: bool = False, pack4: bool = False) -> QuantWeight:
    """Expert weights w [..., X, in, out] (stacked [L, X, ...] or one layer's [X, ...]) → QuantWeight:
    "int8" / "fp8": q like w, scale [..., X, out] f32, one per expert and output channel (`quantize`
    with the leading axes flattened into its layer axis). "int4": `quantize_int4`'s groups along `in`
    (`int4_group(in)`), q int4 like w, scale [..., X, in/g, out] f32 (block scales); `pack4`: q packed
    two a byte along `in` ([..., X, in/2, out] uint8, quant_pack4.py) where the groups are even."""
    if method not in (*_QMAX, "int4"):
        raise ValueError(f"quantization={method!r} is not supported for expert weights: use 'int8', 'fp8' or 'int4'")
    flat = w.reshape((-1,) + w.shape[-2:])  # [N, in, out]
    if method == "int4":
        qw = quantize_int4(flat, 1, stacked=True)  # q [N, in, out] int4, scale [N, in/g, out]
        qw = QuantWeight(qw.q.reshape(w.shape), qw.scale.reshape(w.shape[:-2] + qw.scale.shape[-2:]))
        return pack_int4(qw) if pack4 else qw
    qw = quantize(flat, method, 1, stacked=True, fp8_bits=fp8_bits)  # [N, in, out]
    return QuantWeight(qw.q.reshape(w.shape), qw.scale.reshape(w.shape[:-2] + w.shape[-1:]))


def dequantize_experts(w: QuantWeight, dtype=jnp.float32, xp=jnp):
    """The full-precision expert weights [..., X, in, out] a QuantWeight of `quantize_experts`' form
    stands for (per-channel scale [..., X, out]; or block scales [..., X, in/B, out], with an offset
    for AWQ / GPTQ, a 4-bit q perhaps packed; `xp`: jax.numpy or numpy)."""
    w = w.unpacked(xp)
    q, s, o = w.q, w.scale, w.offset
    n = q.size // (q.shape[-2] * q.shape[-1])
    tail = s.shape[-2:] if s.ndim == q.ndim else s.shape[-1:]  # [in/B, out] or [out]
    flat = QuantWeight(q.reshape((n,) + q.shape[-2:]), s.reshape((n,) + tail),
                       None if o is None else o.reshape((n,) + tail))
    return dequantize(flat, 1, stacked=True, dtype=dtype, xp=xp).reshape(q.shape)


def expert_scale_axes(weight_axes: tuple[str, ...]) -> tuple[str, ...]:
    """Logical axes of an expert weight's scale: the weight's without its contracted (second to last) axis."""
    return weight_axes[:-2] + weight_axes[-1:]


def block_axis(w: QuantWeight, num_contracted: int, stacked: bool = False) -> int | None:
    """The axis of q (and scale) that block scales divide, or None for per-output-channel scales."""
    if w.scale.ndim != w.q.ndim:
        return None
    return (1 if stacked else 0) + num_contracted - 1


def dequantize(w: QuantWeight, num_contracted: int, stacked: bool = False, dtype=jnp.float32, xp=jnp):
    """The full-precision weight a QuantWeight stands for (tests, references, and the host fallback
    of a kept-quantized checkpoint; `xp`: jax.numpy or numpy)."""
    w = w.unpacked(xp)
    lead = 1 if stacked else 0
    b = block_axis(w, num_contracted, stacked)
    if b is None:
        s = xp.expand_dims(w.scale, tuple(range(lead, lead + num_contracted)))
    else:
        s = xp.repeat(w.scale, w.q.shape[b] // w.scale.shape[b], axis=b)
    d = fp8_view(w.q, xp).astype(xp.float32) * s.astype(xp.float32)
    if w.offset is not None:  # block form only (4-bit asymmetric): scale * q + offset, as GGUF Q4_1 computes it
        d = d + xp.repeat(w.offset, w.q.shape[b] // w.offset.shape[b], axis=b).astype(xp.float32)
    return d.astype(dtype)


def quant_einsum(spec: str, x: jax.Array, w: QuantWeight, chunked: bool = False, layer=None) -> jax.Array:
    """`jnp.einsum(spec, x, dequantize(w))` with the scale applied to the output: x [T, in...] →
    [T, out...] in x's dtype (accumulated in f32). `chunked` (the CPU backend, one device): the dot
    runs over chunks of the output columns, each dequantized alone (jaxllm/models/quant_dot.py), so
    no full-precision copy of the weight exists; with `layer`, w is stacked [L, ...] and its layer
    `layer` is read in place, chunk by chunk. Otherwise, block scales (scale.ndim == q.ndim): the dot
    runs per block of the last contracted axis ([T, nb, out...] partial sums, then scaled and
    summed over nb) while that partial is no larger than the weight; a larger step (a long prefill)
    dequantizes the weight into the dot instead, once per step for all its tokens."""
    if chunked:
        return quant_dot_flat(x, w.q, w.scale, layer=layer, offset=w.offset, packed=w.packed).astype(x.dtype)
    w = w.unpacked()  # a packed 4-bit q (a model loaded for the chunked dot) → int4 / uint4
    w = QuantWeight(fp8_view(w.q), w.scale, w.offset)  # uint8 bits (a model loaded for the chunked dot) → float8
    if w.scale.ndim != w.q.ndim:
        y = leading_dot(x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)  # [T, out...] f32
        return (y * w.scale).astype(x.dtype)
    nc = x.ndim - 1  # contracted axes: all of x's but the tokens axis
    nb = w.scale.shape[nc - 1]
    partial_size = x.shape[0] * w.scale.size  # [T, in_lead..., nb, out...]: T x the scale's size
    if partial_size > w.q.size:
        y = leading_dot(x, dequantize(w, nc, dtype=x.dtype), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    bsz = w.q.shape[nc - 1] // nb
    xb = x.reshape(x.shape[:-1] + (nb, bsz))  # [T, in..., nb, B]
    qb = w.q.reshape(w.q.shape[:nc - 1] + (nb, bsz) + w.q.shape[nc:])  # [in..., nb, B, out...]
    letters = "acdfgijklmopqrsuvwxyz"  # not t, n, b (tokens, blocks, within a block)
    lead, outs = letters[:nc - 1], letters[nc - 1:nc - 1 + w.q.ndim - nc]
    part = jnp.einsum(f"t{lead}nb,{lead}nb{outs}->t{lead}n{outs}", xb, qb.astype(x.dtype),
                      preferred_element_type=jnp.float32)  # [T, in_lead..., nb, out...] f32
    y = jnp.einsum(f"t{lead}n{outs},{lead}n{outs}->t{outs}", part, w.scale.astype(jnp.float32))  # [T, out...] f32
    if w.offset is not None:  # + sum_g (sum of x over block g) * offset_g: a [T, nb] x [nb, out] dot
        xsum = jnp.sum(xb.astype(jnp.float32), axis=-1)  # [T, in_lead..., nb] f32
        y = y + jnp.einsum(f"t{lead}n,{lead}n{outs}->t{outs}", xsum, w.offset.astype(jnp.float32))
    return y.astype(x.dtype)


def pack_int4(w: QuantWeight, xp=jnp) -> QuantWeight:
    """A 4-bit QuantWeight with block scales → its packed form (two values a byte, quant_pack4.py),
    the chunked dot's; unchanged when it is not 4-bit, already packed, or its blocks are odd."""
    if w.packed or not is_int4(w.q.dtype):
        return w
    axis = can_pack(tuple(w.q.shape), tuple(w.scale.shape))
    if axis is None:
        return w
    packed = "int4" if jnp.dtype(w.q.dtype) == jnp.dtype(jnp.int4) else "uint4"
    return QuantWeight(pack4(w.q, axis, w.scale.shape[axis], xp), w.scale, w.offset, packed, axis)


def scale_axes(weight_axes: tuple[str, ...], num_contracted: int) -> tuple[str, ...]:
    """Logical axes of a stacked weight's scale: the weight's ("layers", in..., out...) without the
    contracted axes, so the scale is sharded like the weight's output axes."""
    return weight_axes[:1] + weight_axes[1 + num_contracted:]


def weight_bytes(value) -> int:
    """Device bytes of a held parameter (array, QuantWeight, or a list of per-layer ones)."""
    if isinstance(value, (list, tuple)):
        return sum(weight_bytes(v) for v in value)
    return int(value.nbytes)
