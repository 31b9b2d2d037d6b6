"""AWQ, GPTQ and compressed-tensors pack-quantized int4 HF checkpoints: their projections kept 4-bit (`QuantWeight` int4 / uint4 with
group scales and offsets, jaxllm/models/quant.py), everything else as stored.

`quantization_config` (config.json), as vLLM reads it:
- quant_method "awq" (AutoAWQ / transformers AwqConfig): `bits` (or `w_bit`) 4, `group_size` (or
  `q_group_size`, -1: one group per input row), `zero_point` true, `version` "gemm" (the GEMM layout;
  GEMV / Marlin / exllama layouts are refused).
- quant_method "gptq" (AutoGPTQ / GPTQModel): `bits` 4, `group_size` (-1 too), `sym` true/false,
  `desc_act` false (act-order checkpoints, whose `g_idx` permutes the groups, are refused naming
  the field), `checkpoint_format` "gptq" (v1: stored zeros are zero - 1) or "gptq_v2" (zeros as they are).

Tensors of a quantized linear `X` (HF [out, in] orientation, G = group size, int32 packing 8
nibbles a word, nibble j at bits 4j..4j+3):
- AWQ GEMM: `X.qweight` int32 [in, out/8] packed along the output axis in AWQ's interleaved order:
  nibble j of word c holds output column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j]; `X.qzeros` int32
  [in/G, out/8] likewise; `X.scales` f16 [in/G, out]. w = (q - z) * s.
- GPTQ: `X.qweight` int32 [in/8, out] packed along the input axis in order: nibble j of row r is
  input row 8r + j; `X.qzeros` int32 [in/G, out/8] packed along the output axis in order (v1: + 1);
  `X.scales` f16 [in/G, out]; `X.g_idx` int32 [in] (must be i // G: no act-order). w = (q - z) * s.

Held as block scales along the last contracted axis (jaxllm's input-major layout): blocks of
b = gcd(G, that axis: in, or head_dim for o_proj) rows, each with its group's scale, so o_proj's
[heads, head_dim] input takes any G. A projection whose zeros are all 8 (symmetric GPTQ) is held as
int4 q - 8 with no offset; otherwise uint4 q with offset m = -s * z in f32 (s is f16 and z <= 16, so
s*z and s*q + m are exact in f32: the dequantized weight equals (q - z) * s bit for bit).
q/k/v and gate/up (fused) are kept all together or not at all; a layer's projection stored
unquantized (modules_to_not_convert), or any group of it, is dequantized to fp32 instead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.gguf_quant import PROJECTIONS

RawGet = Callable[[str], "np.ndarray | None"]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output column 8c + AWQ_ORDER[j]
_GROUPS = (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
           ("mlp.gate_proj.weight", "mlp.up_proj.weight"))


@dataclasses.dataclass(frozen=True)
class Int4Scheme:
    method: str  # "awq" | "gptq" | "compressed-tensors"
    group_size: int  # -1: one group over the whole input
    zero_plus_one: bool  # GPTQ v1: the stored zeros are zero - 1
    symmetric: bool = True  # compressed-tensors: no weight_zero_point (zero 8 in unsigned terms)


def _refuse(source: str, field: str, value, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: quantization_config.{field}={value!r} is not supported; jaxllm loads {what}")


def parse(qc: dict, source: str) -> Int4Scheme:
    """config.json's quantization_config with quant_method "awq" or "gptq" → Int4Scheme, or one line."""
    method = qc.get("quant_method")
    bits_field = "w_bit" if "w_bit" in qc and "bits" not in qc else "bits"
    bits = qc.get(bits_field)
    if bits != 4:
        raise _refuse(source, bits_field, bits, f"{method} int4 weights (bits 4)")
    g_field = "q_group_size" if "q_group_size" in qc and "group_size" not in qc else "group_size"
    g = qc.get(g_field, 128)
    if not isinstance(g, int) or isinstance(g, bool) or (g <= 0 and g != -1):
        raise _refuse(source, g_field, g, "a positive group size or -1 (one group per row)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(source, "version", qc.get("version"), "AWQ's GEMM layout (version 'gemm')")
        if qc.get("zero_point", True) is not True:
            raise _refuse(source, "zero_point", qc.get("zero_point"), "AWQ with zero points (zero_point true)")
        return Int4Scheme("awq", g, zero_plus_one=False)
    if qc.get("desc_act", False):
        raise _refuse(source, "desc_act", qc.get("desc_act"), "GPTQ without act-order (desc_act false)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(source, "checkpoint_format", fmt, "GPTQ's 'gptq' (v1) or 'gptq_v2' layout")
    if qc.get("sym", True) not in (True, False):
        raise _refuse(source, "sym", qc.get("sym"), "sym true or false")
    return Int4Scheme("gptq", g, zero_plus_one=fmt == "gptq")


def parse_compressed(qc: dict, source: str) -> Int4Scheme:
    """A compressed-tensors config with format "pack-quantized": every config group's `weights`
    `type: int, num_bits: 4`, strategy "group" (`group_size`) or "channel", no act-order, one
    scheme for all groups; input activations unquantized (W4A16)."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(source, "config_groups", groups, "at least one group of int4 weights")
    found = set()
    for gname, g in groups.items():
        f = f"config_groups.{gname}"
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict) or w.get("type") != "int" or w.get("num_bits") != 4:
            raise _refuse(source, f"{f}.weights", w, "pack-quantized int4 weights (type 'int', num_bits 4)")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise _refuse(source, f"{f}.weights.strategy", strategy, "pack-quantized strategies group, channel")
        if w.get("actorder") not in (None, False):
            raise _refuse(source, f"{f}.weights.actorder", w.get("actorder"), "weights without act-order")
        if w.get("dynamic", False):
            raise _refuse(source, f"{f}.weights.dynamic", w.get("dynamic"), "weights quantized ahead (dynamic false)")
        if g.get("input_activations") or g.get("output_activations"):
            raise _refuse(source, f"{f}.input_activations", g.get("input_activations") or g.get("output_activations"),
                          "pack-quantized int4 weights with unquantized activations (W4A16)")
        gs = w.get("group_size") if strategy == "group" else -1
        if not isinstance(gs, int) or isinstance(gs, bool) or (gs <= 0 and gs != -1):
            raise _refuse(source, f"{f}.weights.group_size", gs, "a positive group size")
        found.add((gs, bool(w.get("symmetric", True))))
    if len(found) != 1:
        raise _refuse(source, "config_groups", sorted(found), "one int4 scheme (group size, symmetric) for all groups")
    (gs, sym), = found
    return Int4Scheme("compressed-tensors", gs, zero_plus_one=False, symmetric=sym)


def unpack_cols(packed: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 [r, c/8] packed along the last axis → uint8 [r, c]: column 8w + order[j] is nibble j of word w."""
    p = np.asarray(packed).view(np.uint32)
    nib = np.stack([(p >> np.uint32(4 * j)) & np.uint32(0xF) for j in range(8)], axis=-1)  # [r, c/8, 8]
    out = np.empty_like(nib)
    out[..., list(order)] = nib
    return out.reshape(p.shape[0], -1).astype(np.uint8)


def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """int32 [r/8, c] packed along the first axis → uint8 [r, c]: row 8w + j is nibble j of row w's words."""
    p = np.asarray(packed).view(np.uint32)
    nib = np.stack([(p >> np.uint32(4 * j)) & np.uint32(0xF) for j in range(8)], axis=1)  # [r/8, 8, c]
    return nib.reshape(-1, p.shape[1]).astype(np.uint8)


def read_linear(raw: RawGet, weight_name: str, scheme: Int4Scheme, out_dim: int, in_dim: int, source: str):
    """A quantized linear's tensors → (q [in, out] uint8, z [groups, out] uint8, s [groups, out] f16,
    G), or None when `X.qweight` is absent (stored unquantized). HF orientation unpacked, input-major."""
    stem = weight_name[:-len("weight")]
    if scheme.method == "compressed-tensors":
        return _read_packed(raw, stem, scheme, out_dim, in_dim, source)
    qw = raw(stem + "qweight")
    if qw is None:
        return None
    g = in_dim if scheme.group_size == -1 else scheme.group_size
    if in_dim % g:
        raise CheckpointError(f"{source}: {stem}qweight: group_size={scheme.group_size} does not divide in={in_dim}")
    qz, sc = raw(stem + "qzeros"), raw(stem + "scales")
    if qz is None or sc is None:
        raise CheckpointError(f"{source}: {stem}qweight has no {stem}qzeros / {stem}scales beside it")
    ng = in_dim // g
    want = {"qweight": (in_dim, out_dim // 8) if scheme.method == "awq" else (in_dim // 8, out_dim),
            "qzeros": (ng, out_dim // 8), "scales": (ng, out_dim)}
    for n, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
        if tuple(np.shape(t)) != want[n]:
            raise CheckpointError(f"{source}: tensor {stem}{n} has shape {list(np.shape(t))}; the config and "
                                  f"group_size={scheme.group_size} imply {list(want[n])} ({scheme.method})")
    if scheme.method == "awq":
        q, z = unpack_cols(qw, AWQ_ORDER), unpack_cols(qz, AWQ_ORDER)
    else:
        q, z = unpack_rows(qw), unpack_cols(qz)
        if scheme.zero_plus_one:
            z = z + np.uint8(1)  # v1 stores zero - 1 (8 → 7); a stored 15 reads 16, as vLLM's kernels read it
        gi = raw(stem + "g_idx")
        if gi is not None and not np.array_equal(np.asarray(gi), np.arange(in_dim) // g):
            raise CheckpointError(f"{source}: tensor {stem}g_idx is not i // group_size (an act-order checkpoint); "
                                  f"quantization_config.desc_act=true is not supported")
    s = np.asarray(sc)
    if not np.all(np.isfinite(s.astype(np.float32))):
        raise CheckpointError(f"{source}: tensor {stem}scales has non-finite values")
    return q, z, s if s.dtype == np.float16 else s.astype(np.float32), g


def _read_packed(raw: RawGet, stem: str, scheme: Int4Scheme, out_dim: int, in_dim: int, source: str):
    """compressed-tensors pack-quantized: `X.weight_packed` int32 [out, in/8] packed along the input
    in order (nibble j of word w = input 8w + j), values q + 8 (unsigned); `X.weight_scale` [out,
    in/G] ([out, 1] per channel); asymmetric: `X.weight_zero_point` int32 [out/8, in/G] packed along
    the output axis, zero + 8; `X.weight_g_idx` refused unless i // G. w = (q - zero) * scale."""
    qw = raw(stem + "weight_packed")
    if qw is None:
        return None
    g = in_dim if scheme.group_size == -1 else scheme.group_size
    if in_dim % g or in_dim % 8 or out_dim % 8:
        raise CheckpointError(f"{source}: {stem}weight_packed: group_size={scheme.group_size} / [out, in]="
                              f"{[out_dim, in_dim]} not whole groups of int32 words")
    ng = in_dim // g
    sc, zp = raw(stem + "weight_scale"), raw(stem + "weight_zero_point")
    want = {"weight_packed": (qw, (out_dim, in_dim // 8)), "weight_scale": (sc, (out_dim, ng))}
    if not scheme.symmetric:
        want["weight_zero_point"] = (zp, (out_dim // 8, ng))
    for n, (t, shape) in want.items():
        if t is None or tuple(np.shape(t)) != shape:
            raise CheckpointError(f"{source}: tensor {stem}{n} has shape {None if t is None else list(np.shape(t))}; "
                                  f"expected {list(shape)} (pack-quantized, group_size={scheme.group_size})")
    gi = raw(stem + "weight_g_idx")
    if gi is not None and not np.array_equal(np.asarray(gi), np.arange(in_dim) // g):
        raise CheckpointError(f"{source}: tensor {stem}weight_g_idx is not i // group_size (act-order); "
                              f"weights.actorder is not supported")
    q = np.ascontiguousarray(unpack_cols(qw).T)  # [in, out] uint8: q + 8
    z = np.full((ng, out_dim), 8, np.uint8) if scheme.symmetric else np.ascontiguousarray(unpack_rows(zp).T)
    s = np.asarray(sc)
    s = s if s.dtype == np.float16 else s.astype(np.float32)
    if not np.all(np.isfinite(s.astype(np.float32))):
        raise CheckpointError(f"{source}: tensor {stem}weight_scale has non-finite values")
    return q, z, np.ascontiguousarray(s.T), g


def dequantize_linear(q, z, s, g) -> np.ndarray:
    """(q [in, out], z, s [groups, out], G) → the HF-oriented [out, in] f32 weight (q - z) * s."""
    zf = np.repeat(z.astype(np.float32), g, axis=0)
    sf = np.repeat(s.astype(np.float32), g, axis=0)
    return ((q.astype(np.float32) - zf) * sf).T


def dequantizing(raw: RawGet, scheme: Int4Scheme, source: str, shape_of: Callable[[str], tuple]) -> RawGet:
    """`raw` where a missing `X.weight` beside an `X.qweight` is that linear dequantized to f32 [out, in]."""
    def get(name: str):
        t = raw(name)
        if t is None and name.endswith("weight") and raw(name[:-len("weight")] + _packed(scheme)) is not None:
            out_dim, in_dim = shape_of(name)
            return dequantize_linear(*read_linear(raw, name, scheme, out_dim, in_dim, source))
        return t
    return get


def _packed(scheme: Int4Scheme) -> str:
    """The suffix of a quantized linear's packed tensor."""
    return "weight_packed" if scheme.method == "compressed-tensors" else "qweight"


def shapes(config) -> dict:
    """HF suffix -> ([out, in], the last contracted axis, our layout of an [in or in/b, out] array)."""
    c = config
    H, K, D, E, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    return {"self_attn.q_proj.weight": ((H * D, E), E, lambda a: a.reshape(a.shape[0], H, D)),
            "self_attn.k_proj.weight": ((K * D, E), E, lambda a: a.reshape(a.shape[0], K, D)),
            "self_attn.v_proj.weight": ((K * D, E), E, lambda a: a.reshape(a.shape[0], K, D)),
            "self_attn.o_proj.weight": ((E, H * D), D, lambda a: a.reshape(H, a.shape[0] // H, E)),
            "mlp.gate_proj.weight": ((F, E), E, lambda a: a),
            "mlp.up_proj.weight": ((F, E), E, lambda a: a),
            "mlp.down_proj.weight": ((E, F), F, lambda a: a)}


def assemble_int4(config, raw: RawGet, scheme: Int4Scheme, source: str) -> dict:
    """{stacked param name: QuantWeight(q [L, in..., out...] int4 | uint4, scale [L, in.../b, out...] f16,
    offset None | [L, in.../b, out...] f32)} of the projections stored quantized in every layer (numpy)."""
    from jaxllm.models.quant import QuantWeight

    L = config.num_layers
    sh = shapes(config)
    kept = [s for s in PROJECTIONS
            if all(raw(f"model.layers.{i}.{s[:-len('weight')]}{_packed(scheme)}") is not None for i in range(L))]
    for group in _GROUPS:
        if not all(g in kept for g in group):
            kept = [s for s in kept if s not in group]
    groups = [g for g in _GROUPS if g[0] in kept] + [(s,) for s in kept if not any(s in g for g in _GROUPS)]
    params = {}
    for group in groups:
        loaded = {}
        for suffix in group:
            (out_dim, in_dim), last_in, _ = sh[suffix]
            loaded[suffix] = [read_linear(raw, f"model.layers.{i}.{suffix}", scheme, out_dim, in_dim, source)
                              for i in range(L)]
        sym = all(np.all(z == 8) for rows in loaded.values() for _, z, _, _ in rows)  # fused: one form for all
        for suffix, rows in loaded.items():
            (out_dim, in_dim), last_in, layout = sh[suffix]
            qs, ss, ms = [], [], []
            for q, z, s, g in rows:
                b = math.gcd(g, last_in)  # jaxllm's block: divides both the group and the blocked axis
                rows_of = np.arange(in_dim // b) * b // g  # [in/b]: each block's group
                sb = s[rows_of]  # [in/b, out] f16
                if sym:
                    qs.append(layout((q.astype(np.int8) - 8)))
                else:
                    qs.append(layout(q))
                    ms.append(layout(-(sb.astype(np.float32) * z[rows_of].astype(np.float32))))  # [in/b, out] f32
                ss.append(layout(sb))
            qd = ml_dtypes.int4 if sym else ml_dtypes.uint4
            params[PROJECTIONS[suffix]] = QuantWeight(np.stack(qs).astype(qd), np.stack(ss),
                                                      np.stack(ms) if ms else None)
    return params
