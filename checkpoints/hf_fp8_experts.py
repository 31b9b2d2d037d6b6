"""An fp8 HF mixture-of-experts checkpoint's expert weights kept as float8 `QuantWeight`s (Mixtral's
`block_sparse_moe.experts.N.w1/w3/w2`, Qwen3-MoE's `mlp.experts.N.gate_proj/up_proj/down_proj`, each
`weight` [out, in] float8_e4m3fn with its scale beside it, checkpoints/hf_fp8.py's forms):

- per tensor ([] / [1]) or per output channel ([out, 1] / [out]) → one scale per expert and output
  channel, scale [L, X, out] (the form `--quantization fp8` gives, jaxllm/models/moe_quant.py);
- blocks [ceil(out/bo), ceil(in/bi)] (`fp8` FineGrainedFP8 as in Qwen3-30B-A3B-FP8: 128 x 128) → the
  block form [L, X, in/b, out], b = gcd(bi, in), each block's scale repeated over its output columns.

Kept when every expert of every layer stores all three of gate / up / down in float8; gate and up (fused
into `we_gate_up`) take the block form together when either has block scales. Nothing is re-rounded.
"""
from __future__ import annotations

import math

import numpy as np

from checkpoints.assemble import _MOE_NAMES
from checkpoints.hf_fp8 import block_scale, channel_scale, read_linear


def expert_names(config) -> dict[str, str]:
    """{stacked param name: the HF suffix of expert {x}'s weight, with `{x}` to fill}."""
    block, (g, u, d) = _MOE_NAMES[config.architecture]
    return {p: f"{block}.experts.{{x}}.{n}.weight" for p, n in
            (("layers.we_gate", g), ("layers.we_up", u), ("layers.we_down", d))}


def assemble_fp8_experts(config, raw, stored_f8, scheme, source: str) -> dict:
    """{"layers.we_gate" / "we_up": QuantWeight(q [L, X, E, F] float8_e4m3fn, scale [L, X, F] or
    [L, X, E/b, F] f32), "layers.we_down": ([L, X, F, E], [L, X, E] or [L, X, F/b, E])} as numpy,
    or {} when some expert weight is not stored in float8 (then all are dequantized by the caller)."""
    from jaxllm.models.quant import QuantWeight

    c = config
    L, X, E, F = c.num_layers, c.num_experts, c.hidden_size, c.moe_intermediate_size
    names = expert_names(c)
    every = [f"model.layers.{i}.{s.format(x=x)}" for s in names.values() for i in range(L) for x in range(X)]
    if not all(stored_f8(n) for n in every):
        return {}
    dims = {"layers.we_gate": (F, E), "layers.we_up": (F, E), "layers.we_down": (E, F)}  # HF [out, in]
    loaded = {}  # param -> per layer, per expert: (q [out, in] f8, scale, kind)
    for p, suffix in names.items():
        out_dim, in_dim = dims[p]
        layers = []
        for i in range(L):
            row = []
            for x in range(X):
                name = f"model.layers.{i}.{suffix.format(x=x)}"
                row.append(read_linear(raw, name, out_dim, in_dim, scheme.block, source))
            layers.append(row)
        loaded[p] = layers
    out = {}
    for group in (("layers.we_gate", "layers.we_up"), ("layers.we_down",)):
        blocked = any(k == "block" for p in group for row in loaded[p] for _, _, k in row)
        for p in group:
            out_dim, in_dim = dims[p]
            b = math.gcd(scheme.block[1], in_dim) if blocked else None
            qs = np.stack([np.stack([q.T for q, _, _ in row]) for row in loaded[p]])  # [L, X, in, out] f8
            if blocked:
                ss = np.stack([np.stack([block_scale(s, k, out_dim, in_dim, scheme.block, b) for _, s, k in row])
                               for row in loaded[p]])  # [L, X, in/b, out]
            else:
                ss = np.stack([np.stack([channel_scale(s, out_dim) for _, s, _ in row]) for row in loaded[p]])  # [L, X, out]
            out[p] = QuantWeight(qs, ss.astype(np.float32))
    return out
