"""Checkpoint params that arrive already quantized (`QuantWeight`s of numpy arrays: a GGUF's Q8_0
projections, int8 with block-32 scales, checkpoints/gguf_quant.py): the rules for combining them
with `--quantization`, and their placement.

- no flag, or `int8`: placed as they are (int8 already; the block scales are kept, nothing is
  rounded again); the other projections of the same checkpoint are quantized per channel by `int8`.
- `fp8`: ValueError, one line: re-rounding int8 weights to e4m3 would only add error.
- tensor parallelism: the block-scale layout is not sharded yet; the projections are dequantized to
  fp32 on the host (logged) and placed like any full-precision checkpoint.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize

log = logging.getLogger("jaxllm.models")
# checkpoint (unfused) name -> its number of contracted axes after "layers"
_CONTRACTED = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": QUANT_PARAMS["layers.wo"],
               "layers.w_gate": 1, "layers.w_up": 1, "layers.w_down": 1}


def names(params: dict) -> list[str]:
    return sorted(k for k, v in params.items() if isinstance(v, QuantWeight))


def check(params: dict, quantization: str | None) -> None:
    """ValueError when `quantization` conflicts with params that are already quantized."""
    kept = names(params)
    if kept and quantization not in (None, "int8"):
        raise ValueError(f"quantization={quantization!r} conflicts with the checkpoint's int8 weights "
                         f"({', '.join(kept)}: GGUF Q8_0, kept quantized); load it without quantization or with 'int8'")


def dequantize_for_layout(params: dict) -> None:
    """In place: each pre-quantized param → its fp32 numpy weight (the tensor-parallel fallback)."""
    kept = names(params)
    if kept:
        log.info("tensor parallelism: dequantizing the checkpoint's int8 block-scaled %s to fp32", ", ".join(kept))
    for k in kept:
        params[k] = dequantize(params[k], _CONTRACTED[k], stacked=True, dtype=np.float32, xp=np)


def place(parts: list[QuantWeight], fn) -> QuantWeight:
    """One held projection from its pre-quantized checkpoint parts (stacked, or one layer's):
    `fn(jnp, *arrays)` (fusion.placement_plan: concatenation on the output axes) applied to the q
    parts and to the scale parts alike (the scales have the weight's output axes)."""
    q = [jnp.asarray(p.q) for p in parts]  # int8, as stored
    s = [jnp.asarray(p.scale) for p in parts]  # f16 block scales as stored (8.5 bits a weight in all)
    if fn is None:
        return QuantWeight(q[0], s[0])
    return QuantWeight(fn(jnp, *q), fn(jnp, *s))
