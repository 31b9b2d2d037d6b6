"""GGUF projections kept quantized: Q8_0 tensors become int8 `QuantWeight`s with their block scales.

A Q8_0 block is 34 bytes: one f16 scale `d` then 32 int8 `q`, the weight being `d * q`; blocks run
along a row of the HF-oriented [out, in] tensor (the input axis). That is exactly an int8 weight
with one scale per 32 inputs per output channel, so the seven per-layer projections (q/k/v/o,
gate/up/down) load as `QuantWeight(q [L, in..., out...] int8, scale [L, in.../32, out...] f16)`
(jaxllm/models/quant.py: block scales along the last contracted axis) with no dequantization and no
rounding: the matmul computes the same products as the dequantized fp32 weight.

Every other type (F32/F16/BF16, Q4_0, Q4_1, Q4_K, Q6_K, ...) and every other tensor (embedding, LM
head, norms, biases) dequantizes to fp32 as before (gguf_loader.py). A projection is kept only when
all its layers are Q8_0 (llama.cpp's mixed "_M" files vary the type per layer).
"""
from __future__ import annotations

import numpy as np

from checkpoints.errors import CheckpointError

BLOCK = 32
# HF projection name (after "model.layers.{i}.") -> the jaxllm stacked param it becomes
PROJECTIONS = {"self_attn.q_proj.weight": "layers.wq", "self_attn.k_proj.weight": "layers.wk",
               "self_attn.v_proj.weight": "layers.wv", "self_attn.o_proj.weight": "layers.wo",
               "mlp.gate_proj.weight": "layers.w_gate", "mlp.up_proj.weight": "layers.w_up",
               "mlp.down_proj.weight": "layers.w_down"}


def q8_0_blocks(data: np.ndarray, out_dim: int, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's raw bytes (the reader's uint8 [out, in/32*34]) → (q [out, in] int8,
    d [out, in/32] f16: the file's scales, exactly)."""
    blocks = np.asarray(data).reshape(out_dim, in_dim // BLOCK, 2 + BLOCK)  # [out, nb, 34] uint8
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # [out, nb] f16, as stored
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out_dim, in_dim)  # [out, in]
    return q, d


def kept_projections(tensors: dict, config) -> dict[str, str]:
    """{HF suffix: param name} of the projections whose every layer is Q8_0 with whole blocks in
    jaxllm's layout (o_proj's input is [heads, head_dim]: head_dim must be a multiple of 32); q/k/v
    and gate/up, fused into one weight each, are kept all together or not at all."""
    import gguf

    out = {}
    for suffix, name in PROJECTIONS.items():
        ts = [tensors.get(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
        if any(t is None or t.tensor_type != gguf.GGMLQuantizationType.Q8_0 for t in ts):
            continue
        if suffix == "self_attn.o_proj.weight" and config.head_dim % BLOCK:
            continue
        out[suffix] = name
    for group in (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                  ("mlp.gate_proj.weight", "mlp.up_proj.weight")):  # fused into one held weight: all or none
        if not all(g in out for g in group):
            for g in group:
                out.pop(g, None)
    return out


def assemble_quantized(config, tensors: dict, kept: dict[str, str], unpermute, source: str) -> dict:
    """The kept projections as stacked QuantWeights of numpy arrays in jaxllm's input-major layout
    (the same transposes and reshapes as checkpoints/assemble.py, applied to q and to the scales).
    `unpermute(w, heads)`: llama.cpp's rotary row permutation undone (None: not permuted)."""
    from jaxllm.models.quant import QuantWeight

    c = config
    H, K, D, E, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    # HF suffix -> ([out, in] shape, heads for the rotary unpermute or None, our layout of [in, out])
    shapes = {"self_attn.q_proj.weight": ((H * D, E), H, lambda a: a.reshape(a.shape[0], H, D)),
              "self_attn.k_proj.weight": ((K * D, E), K, lambda a: a.reshape(a.shape[0], K, D)),
              "self_attn.v_proj.weight": ((K * D, E), None, lambda a: a.reshape(a.shape[0], K, D)),
              "self_attn.o_proj.weight": ((E, H * D), None, lambda a: a.reshape(H, a.shape[0] // H, E)),
              "mlp.gate_proj.weight": ((F, E), None, lambda a: a),
              "mlp.up_proj.weight": ((F, E), None, lambda a: a),
              "mlp.down_proj.weight": ((E, F), None, lambda a: a)}
    params = {}
    for suffix, name in kept.items():
        (out_dim, in_dim), heads, layout = shapes[suffix]
        qs, ds = [], []
        for i in range(c.num_layers):
            t = tensors[f"model.layers.{i}.{suffix}"]
            if tuple(int(n) for n in t.shape[::-1]) != (out_dim, in_dim):
                raise CheckpointError(f"{source}: tensor {t.name} has shape {tuple(int(n) for n in t.shape[::-1])}, "
                                      f"the config implies {(out_dim, in_dim)}")
            q, d = q8_0_blocks(t.data, out_dim, in_dim)
            if heads is not None and unpermute is not None:
                q, d = unpermute(q, heads), unpermute(d, heads)
            qs.append(layout(q.T))  # [in..., out...] int8
            ds.append(layout(d.T))  # [in.../32, out...] f16
        params[name] = QuantWeight(np.stack(qs), np.stack(ds))
    return params
