"""fp8 HF checkpoints (compressed-tensors / AutoFP8 / FineGrainedFP8 / ModelOpt, checkpoints/hf_fp8_config.py):
float8_e4m3fn projections kept as `QuantWeight`s, everything else dequantized, and the KV scales.

A quantized linear `X` is stored as `X.weight` [out, in] float8_e4m3fn plus its scale, the weight
being `weight * scale` (the name `weight_scale_inv` notwithstanding, it multiplies too):
- `X.weight_scale` [] or [1]: per tensor → broadcast to one scale per output channel;
- `X.weight_scale` [out, 1] or [out]: per output channel, as jaxllm's fp8 `QuantWeight` holds them;
- `X.weight_scale_inv` (or a compressed-tensors "block" `weight_scale`) [ceil(out/bo), ceil(in/bi)]
  (ModelOpt FP8_PB_WO: [out/bo, 1, in/bi, 1], read as [out/bo, in/bi]):
  one scale per [bo, bi] block → jaxllm's block form (jaxllm/models/quant.py): one scale per
  (input block of B, output column), B = gcd(bi, the last contracted axis: in, or head_dim for
  o_proj) dividing bi, each block's scale repeated over its output columns: the same products.
Nothing is re-rounded: the matmul multiplies the file's e4m3 values by the file's scales.

The seven per-layer projections (gguf_quant.PROJECTIONS) are kept when every layer stores them in
fp8; q/k/v and gate/up (fused into one held weight, jaxllm/models/fusion.py) all together or not at
all; a group mixing per-channel and block scales is held in block form. Any other float8 tensor
(an ignored layer's partner, embeddings, the LM head) is dequantized to fp32 on the host.

KV cache scales (`kv_scales`): per layer `self_attn.k_scale` / `self_attn.v_scale` (llm-compressor,
modelopt), older `self_attn.kv_scale` (AutoFP8: one for both), `self_attn.{k,v}_proj.output_scale`
(early compressed-tensors) or `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale` (older
ModelOpt): [] / [1] per tensor, broadcast over the kv heads, or [kv_heads]. vLLM's convention, the
same as jaxllm's fp8 cache (pallas_kernels/kv_quant.py): a stored e4m3 value x stands for
`x * k_scale` (llm-compressor writes absmax / 448 of its calibration K/V).
"""
from __future__ import annotations

import math
from typing import Callable

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.gguf_quant import PROJECTIONS
from checkpoints.hf_fp8_config import Fp8Scheme

RawGet = Callable[[str], "np.ndarray | None"]  # checkpoint tensor as stored (float8 kept), None if absent
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
_GROUPS = (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
           ("mlp.gate_proj.weight", "mlp.up_proj.weight"))


def is_f8(t) -> bool:
    return t is not None and np.dtype(t.dtype) == F8


def scale_of(raw: RawGet, weight_name: str, source: str) -> np.ndarray:
    """The f32 scale stored beside float8 tensor `weight_name` (`...weight_scale_inv` or `...weight_scale`)."""
    stem = weight_name[:-len("weight")] if weight_name.endswith("weight") else weight_name + "_"
    for n in (stem + "weight_scale_inv", stem + "weight_scale"):
        s = raw(n)
        if s is not None:
            s = np.asarray(s, dtype=np.float32)
            if s.ndim == 4 and s.shape[1] == s.shape[3] == 1:  # ModelOpt FP8_PB_WO [out/bo, 1, in/bi, 1]
                s = s.reshape(s.shape[0], s.shape[2])
            if not np.all(np.isfinite(s)):
                raise CheckpointError(f"{source}: tensor {n} has non-finite values")
            return s
    raise CheckpointError(f"{source}: tensor {weight_name} is float8 but has no {stem}weight_scale(_inv) beside it")


def scale_kind(s: np.ndarray, out_dim: int, in_dim: int, block, name: str, source: str) -> str:
    """"channel" (after broadcasting a per-tensor scale) or "block", from the scale's shape."""
    if block is not None and s.ndim == 2 and s.shape == (-(-out_dim // block[0]), -(-in_dim // block[1])):
        return "block"
    if s.size == 1 or s.shape in ((out_dim, 1), (out_dim,)):
        return "channel"
    want = "[] or [1] (per tensor), [out, 1] (per channel)" + (
        f" or {[-(-out_dim // block[0]), -(-in_dim // block[1])]} (blocks of {list(block)})" if block else "")
    raise CheckpointError(f"{source}: the scale of tensor {name} [{out_dim}, {in_dim}] has shape "
                          f"{list(s.shape)}; expected {want}")


def read_linear(raw: RawGet, name: str, out_dim: int, in_dim: int, block, source: str):
    """A stored fp8 linear `name` -> (q [out, in] f8, its scale, the scale's kind), its shape checked
    against the config's (out_dim, in_dim)."""
    q = np.asarray(raw(name))
    if q.shape != (out_dim, in_dim):
        raise CheckpointError(f"{source}: tensor {name} has shape {q.shape}, the config implies "
                              f"{(out_dim, in_dim)}")
    s = scale_of(raw, name, source)
    return q, s, scale_kind(s, out_dim, in_dim, block, name, source)


def channel_scale(s: np.ndarray, out_dim: int) -> np.ndarray:
    """A per-tensor or per-channel scale → [out] f32."""
    return np.full((out_dim,), s.reshape(-1)[0], np.float32) if s.size == 1 else s.reshape(out_dim)


def block_scale(s: np.ndarray, kind: str, out_dim: int, in_dim: int, block, b: int) -> np.ndarray:
    """The scale → jaxllm's block form [in/b, out] f32 (b divides the checkpoint's input block)."""
    if kind == "channel":
        return np.broadcast_to(channel_scale(s, out_dim), (in_dim // b, out_dim)).copy()
    rows = np.arange(out_dim) // block[0]  # [out]: each output row's block row
    cols = np.arange(in_dim // b) * b // block[1]  # [in/b]: each jaxllm block's checkpoint block column
    return np.ascontiguousarray(s[rows][:, cols].T)  # [in/b, out]


def dequantize(q: np.ndarray, s: np.ndarray, block, name: str, source: str) -> np.ndarray:
    """A float8 tensor [out, in] (or [vocab, hidden]) and its scale → f32 of q's shape."""
    out_dim, in_dim = q.shape if q.ndim == 2 else (q.shape[0], 1)
    kind = scale_kind(s, out_dim, in_dim, block, name, source)
    qf = q.astype(np.float32).reshape(out_dim, in_dim)
    if kind == "channel":
        return (qf * channel_scale(s, out_dim)[:, None]).reshape(q.shape)
    full = np.repeat(np.repeat(s, block[0], axis=0)[:out_dim], block[1], axis=1)[:, :in_dim]  # [out, in]
    return (qf * full).reshape(q.shape)


def dequantizing(raw: RawGet, block, source: str) -> RawGet:
    """`raw` with every float8 tensor dequantized to f32 (what assemble_params reads)."""
    def get(name: str):
        t = raw(name)
        if is_f8(t):
            return dequantize(np.asarray(t), scale_of(raw, name, source), block, name, source)
        return t
    return get


def kept(stored_f8: Callable[[str], bool], num_layers: int) -> list[str]:
    """The HF suffixes (PROJECTIONS) stored in fp8 in every layer, fused groups all or none.
    `stored_f8(name)`: whether the file stores that tensor as float8 (from the header: nothing read)."""
    out = [s for s in PROJECTIONS if all(stored_f8(f"model.layers.{i}.{s}") for i in range(num_layers))]
    for group in _GROUPS:
        if not all(g in out for g in group):
            out = [s for s in out if s not in group]
    return out


def assemble_fp8(config, raw: RawGet, stored_f8: Callable[[str], bool], scheme: Fp8Scheme, source: str) -> dict:
    """{stacked param name: QuantWeight(q [L, in..., out...] float8_e4m3fn, scale [L, out...] f32
    per channel or [L, in.../b, out...] f32 block form)} of the kept projections (numpy)."""
    from jaxllm.models.quant import QuantWeight

    c = config
    H, K, D, E, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    # HF suffix -> ([out, in], per-channel scale shape, our layout of an [in or in/b, out] array)
    shapes = {"self_attn.q_proj.weight": ((H * D, E), (H, D), lambda a: a.reshape(a.shape[0], H, D)),
              "self_attn.k_proj.weight": ((K * D, E), (K, D), lambda a: a.reshape(a.shape[0], K, D)),
              "self_attn.v_proj.weight": ((K * D, E), (K, D), lambda a: a.reshape(a.shape[0], K, D)),
              "self_attn.o_proj.weight": ((E, H * D), (E,), lambda a: a.reshape(H, a.shape[0] // H, E)),
              "mlp.gate_proj.weight": ((F, E), (F,), lambda a: a),
              "mlp.up_proj.weight": ((F, E), (F,), lambda a: a),
              "mlp.down_proj.weight": ((E, F), (E,), lambda a: a)}
    suffixes = kept(stored_f8, c.num_layers)
    groups = [g for g in _GROUPS if g[0] in suffixes] + [(s,) for s in suffixes if not any(s in g for g in _GROUPS)]
    params = {}
    for group in groups:
        loaded = {}  # suffix -> per layer (q [out, in] f8, scale, kind)
        for suffix in group:
            (out_dim, in_dim), _, _ = shapes[suffix]
            rows = []
            for i in range(c.num_layers):
                rows.append(read_linear(raw, f"model.layers.{i}.{suffix}", out_dim, in_dim, scheme.block, source))
            loaded[suffix] = rows
        blocked = any(k == "block" for rows in loaded.values() for _, _, k in rows)
        for suffix, rows in loaded.items():
            (out_dim, in_dim), ch_shape, layout = shapes[suffix]
            last_in = D if suffix == "self_attn.o_proj.weight" else in_dim  # the last contracted axis
            b = math.gcd(scheme.block[1], last_in) if blocked else None
            qs = np.stack([layout(q.T) for q, _, _ in rows])  # [L, in..., out...] float8_e4m3fn
            if blocked:
                ss = np.stack([layout(block_scale(s, k, out_dim, in_dim, scheme.block, b)) for _, s, k in rows])
            else:
                ss = np.stack([channel_scale(s, out_dim).reshape(ch_shape) for _, s, _ in rows])  # [L, out...]
            params[PROJECTIONS[suffix]] = QuantWeight(qs, ss.astype(np.float32))
    return params


_KV_NAMES = (("self_attn.k_scale", "self_attn.v_scale"), ("self_attn.kv_scale", "self_attn.kv_scale"),
             ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
             ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"))


def kv_scales(config, raw: RawGet, source: str):
    """(k_scale [L, kv_heads] f32, v_scale [L, kv_heads] f32, the tensor names read) when every
    layer stores KV scales under one of the known names, else None."""
    L, K = config.num_layers, config.num_kv_heads
    for kn, vn in _KV_NAMES:
        ks = [raw(f"model.layers.{i}.{kn}") for i in range(L)]
        vs = [raw(f"model.layers.{i}.{vn}") for i in range(L)]
        if any(t is None for t in ks + vs):
            continue
        out = []
        for name, ts in ((kn, ks), (vn, vs)):
            rows = []
            for i, t in enumerate(ts):
                t = np.asarray(t, dtype=np.float32).reshape(-1)
                if t.size not in (1, K):
                    raise CheckpointError(f"{source}: tensor model.layers.{i}.{name} has {t.size} values; "
                                          f"expected 1 (per tensor) or {K} (per kv head)")
                if not np.all(np.isfinite(t)) or np.any(t <= 0):
                    raise CheckpointError(f"{source}: tensor model.layers.{i}.{name} = {t.tolist()}: a KV scale "
                                          f"must be finite and > 0")
                rows.append(np.broadcast_to(t, (K,)))
            out.append(np.stack(rows).astype(np.float32))  # [L, K]
        return out[0], out[1], f"{kn}/{vn}" if kn != vn else kn
    return None
