"""An AWQ / GPTQ / compressed-tensors pack-quantized mixture-of-experts checkpoint's expert weights kept
4-bit (Mixtral's `block_sparse_moe.experts.N.w1/w3/w2`, Qwen3-MoE's / Qwen2-MoE's
`mlp.experts.N.gate_proj/up_proj/down_proj`, each stored as checkpoints/hf_int4.py's quantized linear:
`.qweight/.qzeros/.scales` (+ `.g_idx`, refused unless i // G), or `.weight_packed/.weight_scale`).

Held as `QuantWeight`s in the experts' layout (jaxllm/models/moe_quant.py): q [L, X, in, out], block
scales [L, X, in/G, out] f16 (G divides `in`: read_linear checks it), and, unless every zero of the
group is 8 (symmetric: then int4 q - 8 and no offset), uint4 q with offset -s * z [L, X, in/G, out] f32
(exact: the dequantized weight is (q - z) * s bit for bit, as hf_int4.py's projections). gate and up
(fused into `we_gate_up`) take one form together.

Kept when every expert of every layer stores all three quantized; otherwise {} and the caller
dequantizes each stored-quantized expert to fp32 (`expert_shape` names their shapes).
"""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from checkpoints.assemble import _MOE_NAMES
from checkpoints.hf_int4 import Int4Scheme, RawGet, _packed, read_linear

_EXPERT = re.compile(r"\.experts\.\d+\.(\w+)\.weight$")
_SHARED = re.compile(r"\.shared_expert\.(\w+)\.weight$")


def expert_names(config) -> dict[str, str]:
    """{stacked param name: the HF stem of expert {x}'s linear, with `{x}` to fill}."""
    block, (g, u, d) = _MOE_NAMES[config.architecture]
    return {p: f"{block}.experts.{{x}}.{n}" for p, n in
            (("layers.we_gate", g), ("layers.we_up", u), ("layers.we_down", d))}


def expert_shape(config, name: str) -> tuple[int, int] | None:
    """The HF [out, in] of an expert's (or Qwen2-MoE's shared expert's) linear `...weight`, else None."""
    c = config
    _, (_, _, down) = _MOE_NAMES[c.architecture]
    m = _EXPERT.search(name)
    if m:
        F = c.moe_intermediate_size
        return (c.hidden_size, F) if m.group(1) == down else (F, c.hidden_size)
    m = _SHARED.search(name)
    if m and c.shared_expert_intermediate_size:
        S = c.shared_expert_intermediate_size
        return (c.hidden_size, S) if m.group(1) == "down_proj" else (S, c.hidden_size)
    return None


def assemble_int4_experts(config, raw: RawGet, scheme: Int4Scheme, source: str) -> dict:
    """{"layers.we_gate" / "we_up": QuantWeight(q [L, X, E, F], scale [L, X, E/G, F] f16, offset None
    or f32 like the scale), "layers.we_down": ([L, X, F, E], [L, X, F/G, E])} as numpy, or {} when
    some expert's linear is not stored quantized."""
    from jaxllm.models.quant import QuantWeight

    c = config
    L, X, E, F = c.num_layers, c.num_experts, c.hidden_size, c.moe_intermediate_size
    names = expert_names(c)
    suffix = _packed(scheme)
    if not all(raw(f"model.layers.{i}.{s.format(x=x)}.{suffix}") is not None
               for s in names.values() for i in range(L) for x in range(X)):
        return {}
    dims = {"layers.we_gate": (F, E), "layers.we_up": (F, E), "layers.we_down": (E, F)}  # HF [out, in]
    loaded = {p: [[read_linear(raw, f"model.layers.{i}.{s.format(x=x)}.weight", scheme, *dims[p], source)
                   for x in range(X)] for i in range(L)] for p, s in names.items()}
    out = {}
    for group in (("layers.we_gate", "layers.we_up"), ("layers.we_down",)):
        sym = all(np.all(z == 8) for p in group for row in loaded[p] for _, z, _, _ in row)
        for p in group:
            q = np.stack([np.stack([r[0] for r in row]) for row in loaded[p]])  # [L, X, in, out] uint8
            z = np.stack([np.stack([r[1] for r in row]) for row in loaded[p]])  # [L, X, in/G, out] uint8
            s = np.stack([np.stack([r[2] for r in row]) for row in loaded[p]])  # [L, X, in/G, out] f16 / f32
            if sym:
                out[p] = QuantWeight((q.astype(np.int8) - 8).astype(ml_dtypes.int4), s)
            else:
                offset = -(s.astype(np.float32) * z.astype(np.float32))  # [L, X, in/G, out] f32
                out[p] = QuantWeight(q.astype(ml_dtypes.uint4), s, offset)
    return out
