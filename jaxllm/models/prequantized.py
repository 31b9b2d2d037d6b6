"""Checkpoint params that arrive already quantized (`QuantWeight`s of numpy arrays): a GGUF's Q8_0
projections, int8 with block-32 scales, or its Q4_0 / Q4_1 ones, 4-bit (checkpoints/gguf_quant.py),
an fp8 HF checkpoint's, float8_e4m3fn with per-channel or block scales (checkpoints/hf_fp8.py), or
an AWQ / GPTQ checkpoint's, 4-bit with group scales and offsets (checkpoints/hf_int4.py). The rules for combining
them with `--quantization`, and their placement:

- no flag, or the checkpoint's own method (`int8` for Q8_0, `fp8` for an fp8 checkpoint, as vLLM
  infers it from the config): placed as they are (nothing is rounded again; block scales kept); the
  checkpoint's other projections (an fp8 checkpoint's ignored layers) are quantized per channel by
  the flag, or stay full precision without it.
- the other method: ValueError, one line: re-rounding int8 to e4m3 or e4m3 to int8 only adds error
  (use the full-precision checkpoint for that method). 4-bit weights with `--quantization int8|fp8`
  are dequantized and quantized per channel by the flag (`requantize_int4`), as before they were kept.
- tensor parallelism: QuantWeights are sharded like `--quantization`'s (q like the weight,
  per-channel scales like its output axes, block scales, an fp8 checkpoint's or a GGUF's Q8_0 f16
  block-32 ones, like the weight, split into finer blocks where a row-parallel weight's block would
  straddle two devices: jaxllm/parallel/layout.py).
"""
from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize, dequantize_experts, pack_int4

log = logging.getLogger("jaxllm.models")
# checkpoint (unfused) name -> its number of contracted axes after "layers"
_CONTRACTED = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": QUANT_PARAMS["layers.wo"],
               "layers.w_gate": 1, "layers.w_up": 1, "layers.w_down": 1}


def names(params: dict) -> list[str]:
    return sorted(k for k, v in params.items() if isinstance(v, QuantWeight))


_ORIGIN = {"int8": "GGUF Q8_0", "fp8": "an fp8 checkpoint", "int4": "a GGUF Q4 / AWQ / GPTQ checkpoint"}


def method(params: dict) -> str | None:
    """The method of the checkpoint's pre-quantized params ("int8" / "fp8"), None if there are none."""
    kept = names(params)
    return params[kept[0]].method if kept else None


def check(params: dict, quantization: str | None) -> None:
    """ValueError when `quantization` conflicts with params that are already quantized."""
    kept, m = names(params), method(params)
    if kept and quantization not in (None, m):
        raise ValueError(f"quantization={quantization!r} conflicts with the checkpoint's {m} weights "
                         f"({', '.join(kept)}: {_ORIGIN[m]}, kept quantized); load it without quantization "
                         f"or with {m!r}")


def requantize_int4(params: dict, quantization: str | None) -> None:
    """In place: with `quantization` ("int8" / "fp8") given, the checkpoint's 4-bit projections (GGUF
    Q4_0 / Q4_1, AWQ, GPTQ) are dequantized to fp32 first and then quantized per channel by the flag
    like any full-precision weight (what a GGUF Q4 load did before 4-bit weights were kept)."""
    if quantization in ("int8", "fp8"):
        dequantize_all(params, f"quantization={quantization!r}", only="int4")


def dequantize_all(params: dict, why: str, only: str | None = None) -> None:
    """In place: each pre-quantized param (of method `only`, or all) → its fp32 numpy weight, logged."""
    kept = [k for k in names(params) if only is None or params[k].method == only]
    if kept:
        log.info("%s: dequantizing the checkpoint's pre-quantized %s to fp32", why, ", ".join(kept))
    for k in kept:
        if k in _CONTRACTED:
            params[k] = dequantize(params[k], _CONTRACTED[k], stacked=True, dtype=np.float32, xp=np)
        else:  # an fp8 checkpoint's experts, [L, X, in, out] (checkpoints/hf_fp8_experts.py)
            params[k] = dequantize_experts(params[k], dtype=np.float32, xp=np)


def place(parts: list[QuantWeight], fn, fp8_bits: bool = False, pack4: bool = False) -> QuantWeight:
    """One held projection from its pre-quantized checkpoint parts (stacked, or one layer's):
    `fn(jnp, *arrays)` (fusion.placement_plan: concatenation on the output axes) applied to the q
    parts and to the scale parts alike (the scales have the weight's output axes). `fp8_bits`: a
    float8 q is held as its uint8 bits (the chunked dot's form, quant_dot.holds_fp8_bits). `pack4`:
    a 4-bit q is packed two values a byte on the host first (quant_pack4.py, quant_dot.packs_int4;
    packing runs along the contracted axis, so it commutes with fusing the output axes)."""
    if pack4:
        parts = [pack_int4(p, np) for p in parts]
    meta = (parts[0].packed, parts[0].pack_axis)
    q = [jnp.asarray(_bits(p.q) if fp8_bits else p.q) for p in parts]  # int8 / int4 / float8 (or its bits), as stored
    s = [jnp.asarray(p.scale) for p in parts]  # GGUF: f16 block scales as stored; fp8: f32
    o = None if parts[0].offset is None else [jnp.asarray(p.offset) for p in parts]  # like the scales
    if fn is None:
        return QuantWeight(q[0], s[0], None if o is None else o[0], *meta)
    return QuantWeight(fn(jnp, *q), fn(jnp, *s), None if o is None else fn(jnp, *o), *meta)


def _bits(q):
    """numpy float8_e4m3fn → its uint8 bits (a view); other dtypes unchanged."""
    return q.view(np.uint8) if q.dtype == jnp.dtype(jnp.float8_e4m3fn) else q
