"""GGUF projections kept quantized: Q8_0 tensors become int8 `QuantWeight`s with their block scales,
Q4_0 / Q4_1 tensors 4-bit ones (int4 / uint4 + per-block offset).

A Q8_0 block is 34 bytes: one f16 scale `d` then 32 int8 `q`, the weight being `d * q`. A Q4_0 block
is 18 bytes: f16 `d` then 16 bytes of nibbles, w = d * (q - 8); a Q4_1 block 20 bytes: f16 `d`,
f16 `m`, 16 bytes of nibbles, w = d * q + m. In both, byte j of the nibbles holds element j in its
low nibble and element j + 16 in its high one (llama.cpp's `dequantize_row_q4_0/1`, the gguf
package's `Q4_0/Q4_1.dequantize_blocks`). Blocks run along a row of the HF-oriented [out, in]
tensor (the input axis). So each is exactly a weight with one scale (and for Q4_1 one offset) per
32 inputs per output channel, and the seven per-layer projections (q/k/v/o, gate/up/down) load as
`QuantWeight(q [L, in..., out...], scale [L, in.../32, out...] f16[, offset likewise])`
(jaxllm/models/quant.py: block scales along the last contracted axis): Q8_0 q int8, Q4_0 q - 8 as
int4, Q4_1 q as uint4 with offset m. No dequantization and no rounding: the matmul computes the
same products as the dequantized fp32 weight (`d * q (+ m)` per element, then the dot).

Every other type (F32/F16/BF16, Q5_x, K-quants, ...) and every other tensor (embedding, LM head,
norms, biases) dequantizes to fp32 as before (gguf_loader.py). A projection is kept only when all
its layers have one kept type (llama.cpp's mixed "_M" files vary the type per layer), and q/k/v,
gate/up (fused into one held weight) only when they share it. Whether Q4_0 / Q4_1 stay 4-bit:
`JAXLLM_GGUF_Q4` (`q4_mode`): `auto` (default) = `keep`, on every backend (on CPU the chunked dot
reads them as uint8 pairs, a little faster than fp32 there: bench/RESULTS.md, "4-bit on CPU as uint8 pairs");
`fp32` dequantizes them as before 4-bit weights existed.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError

BLOCK = 32
Q4_ENV = "JAXLLM_GGUF_Q4"  # "auto" (default) = "keep": Q4_0 / Q4_1 projections held 4-bit; "fp32": dequantized
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


def q4_blocks(data: np.ndarray, out_dim: int, in_dim: int, qtype: str):
    """A Q4_0 / Q4_1 tensor's raw bytes (uint8 [out, in/32*18 or *20]) → (q [out, in]: Q4_0's q - 8
    as int8 in [-8, 7], Q4_1's q as uint8 in [0, 15]; d [out, in/32] f16; m [out, in/32] f16 or None),
    the file's values exactly."""
    head = 2 if qtype == "Q4_0" else 4
    blocks = np.asarray(data).reshape(out_dim, in_dim // BLOCK, head + BLOCK // 2)  # [out, nb, 18|20] uint8
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # [out, nb] f16
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if qtype == "Q4_1" else None
    nib = blocks[..., head:]  # [out, nb, 16]: element j low nibble, element j + 16 high nibble
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(out_dim, in_dim)  # [out, in] uint8
    return (q.astype(np.int8) - 8 if qtype == "Q4_0" else q), d, m


def q4_mode() -> str:
    """"keep" or "fp32": JAXLLM_GGUF_Q4, "auto" (the default) meaning "keep" on every backend. (Until
    the CPU chunked dot held 4-bit q as uint8 pairs, auto was fp32 on CPU, where XLA's int4 → float
    convert made the 4-bit dot ~3x slower: bench/RESULTS.md, "4-bit weights".)"""
    how = os.environ.get(Q4_ENV, "auto")
    if how not in ("auto", "keep", "fp32"):
        raise CheckpointError(f"{Q4_ENV}={how!r} is invalid: must be 'auto' (= 'keep'), 'keep' "
                              f"(4-bit weights) or 'fp32'")
    return "keep" if how == "auto" else how


def kept_types() -> tuple[str, ...]:
    """The GGUF types kept quantized: Q8_0, and Q4_0 / Q4_1 when `q4_mode()` keeps them."""
    return ("Q8_0",) if q4_mode() == "fp32" else ("Q8_0", "Q4_0", "Q4_1")


def kept_projections(tensors: dict, config) -> dict[str, str]:
    """{HF suffix: param name} of the projections whose every layer has one kept type (Q8_0, Q4_0,
    Q4_1) with whole blocks in jaxllm's layout (o_proj's input is [heads, head_dim]: head_dim must
    be a multiple of 32); q/k/v and gate/up, fused into one weight each, are kept all together (and
    of one type) or not at all."""
    kinds = kept_types()
    out, types = {}, {}
    for suffix, name in PROJECTIONS.items():
        ts = [tensors.get(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
        if any(t is None for t in ts) or len({t.tensor_type.name for t in ts}) != 1:
            continue
        if ts[0].tensor_type.name not in kinds:
            continue
        if suffix == "self_attn.o_proj.weight" and config.head_dim % BLOCK:
            continue
        out[suffix], types[suffix] = name, ts[0].tensor_type.name
    for group in (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                  ("mlp.gate_proj.weight", "mlp.up_proj.weight")):  # fused into one held weight: all or none
        if not all(g in out for g in group) or len({types[g] for g in group}) != 1:
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
        qs, ds, ms = [], [], []
        for i in range(c.num_layers):
            t = tensors[f"model.layers.{i}.{suffix}"]
            if tuple(int(n) for n in t.shape[::-1]) != (out_dim, in_dim):
                raise CheckpointError(f"{source}: tensor {t.name} has shape {tuple(int(n) for n in t.shape[::-1])}, "
                                      f"the config implies {(out_dim, in_dim)}")
            kind = t.tensor_type.name
            if kind == "Q8_0":
                (q, d), m = q8_0_blocks(t.data, out_dim, in_dim), None
            else:
                q, d, m = q4_blocks(t.data, out_dim, in_dim, kind)
            if heads is not None and unpermute is not None:
                q, d = unpermute(q, heads), unpermute(d, heads)
                m = None if m is None else unpermute(m, heads)
            qs.append(layout(q.T))  # [in..., out...] int8 (Q8_0), int8 in [-8, 7] (Q4_0), uint8 in [0, 15] (Q4_1)
            ds.append(layout(d.T))  # [in.../32, out...] f16
            if m is not None:
                ms.append(layout(m.T))  # [in.../32, out...] f16
        q = np.stack(qs)  # [L, in..., out...]
        if kind != "Q8_0":  # 4-bit values: held as int4 / uint4 (packed on the device)
            q = q.astype(ml_dtypes.int4 if kind == "Q4_0" else ml_dtypes.uint4)
        params[name] = QuantWeight(q, np.stack(ds), np.stack(ms) if ms else None)
    return params


def kept_summary(tensors: dict, kept: dict[str, str], num_layers: int) -> str:
    """"Q4_1 x 210 (uint4 + offset)"-style counts of the kept tensors, by type."""
    what = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "uint4 + offset"}
    counts: dict[str, int] = {}
    for suffix in kept:
        kind = tensors[f"model.layers.0.{suffix}"].tensor_type.name
        counts[kind] = counts.get(kind, 0) + num_layers
    return ", ".join(f"{k} x {n} ({what[k]})" for k, n in sorted(counts.items()))
