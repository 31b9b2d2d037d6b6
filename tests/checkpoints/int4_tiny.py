"""Writes tiny AWQ (GEMM) and GPTQ int4 checkpoints from a tiny fp32 HF model, packed with numpy in
each format's exact layout, plus the fp32 checkpoint of the very weights they stand for ((q - z) * s),
the reference the loader is checked against.

Packing (written here word by word, independently of checkpoints/hf_int4.py's unpacking):
- AWQ: qweight int32 [in, out/8], nibble j of word c = column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j];
  qzeros int32 [groups, out/8] the same way; scales f16 [groups, out].
- GPTQ: qweight int32 [in/8, out], nibble j of word r = input row 8r + j; qzeros int32
  [groups, out/8] in plain order, v1 ("gptq") storing zero - 1; scales f16 [groups, out];
  g_idx int32 [in] = i // group.
- compressed-tensors pack-quantized ("compressed"): weight_packed int32 [out, in/8], nibble j of
  word w = input 8w + j, values q + 8 (= the unsigned q here); weight_scale [out, groups];
  asymmetric: weight_zero_point int32 [out/8, groups] packed along the output axis (zero + 8).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_groups(w: np.ndarray, group: int, sym: bool):
    """w [out, in] f32 → (q [in, out] int, z [groups, out] int, s [groups, out] f16): round-to-nearest
    per group of `group` inputs (-1: all), asymmetric min/max, or symmetric (zero 8)."""
    wt = np.ascontiguousarray(w.T, dtype=np.float32)  # [in, out] (C order: safetensors writes raw buffers)
    g = wt.shape[0] if group == -1 else group
    gw = wt.reshape(-1, g, wt.shape[1])  # [groups, G, out]
    if sym:
        s = (np.abs(gw).max(axis=1) / 7.5 + 1e-6).astype(np.float16)  # [groups, out]
        z = np.full(s.shape, 8, np.int64)
    else:
        lo, hi = np.minimum(gw.min(axis=1), 0), np.maximum(gw.max(axis=1), 0)
        s = ((hi - lo) / 15 + 1e-6).astype(np.float16)
        z = np.clip(np.round(-lo / s.astype(np.float32)), 1, 15).astype(np.int64)  # >= 1: GPTQ v1 stores z - 1
    sf = np.repeat(s.astype(np.float32), g, axis=0)
    q = np.clip(np.round(wt / sf) + np.repeat(z, g, axis=0), 0, 15).astype(np.int64)
    return q, z, s


def pack_cols(v: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """[r, c] nibbles → int32 [r, c/8]: word w's nibble j = column 8w + order[j]."""
    r, c = v.shape
    out = np.zeros((r, c // 8), np.uint32)
    for w in range(c // 8):
        for j in range(8):
            out[:, w] |= (v[:, 8 * w + order[j]].astype(np.uint32) & 0xF) << np.uint32(4 * j)
    return out.view(np.int32)


def pack_rows(v: np.ndarray) -> np.ndarray:
    """[r, c] nibbles → int32 [r/8, c]: word w's nibble j = row 8w + j."""
    r, c = v.shape
    out = np.zeros((r // 8, c), np.uint32)
    for w in range(r // 8):
        for j in range(8):
            out[w] |= (v[8 * w + j].astype(np.uint32) & 0xF) << np.uint32(4 * j)
    return out.view(np.int32)


def write_int4(hf_dir: str, out_dir: str, method: str, group: int, sym: bool = False,
               fmt: str = "gptq", skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """→ (the int4 checkpoint dir, the fp32 reference dir holding (q - z) * s). `skip`: tensor stems
    (e.g. "model.layers.1.mlp.down_proj") left unquantized (modules_to_not_convert). MoE: each
    expert's linear (`experts.N.w1` / `gate_proj` ...) and Qwen2-MoE's shared expert's quantized too."""
    ref_dir = out_dir + "-ref"
    for d in (out_dir, ref_dir):
        shutil.copytree(hf_dir, d, dirs_exist_ok=True)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    qt, ref = {}, {}
    for name, t in tensors.items():
        stem = name[:-len(".weight")]
        linear = stem.split(".", 3)[-1] in PROJ or re.search(r"\.(experts\.\d+|shared_expert)\.\w+$", stem)
        if not (name.endswith(".weight") and linear) or stem in skip:
            qt[name] = ref[name] = t
            continue
        q, z, s = quantize_groups(t, group, sym)
        g = q.shape[0] if group == -1 else group
        deq = (q - np.repeat(z, g, axis=0)).astype(np.float32) * np.repeat(s.astype(np.float32), g, axis=0)
        ref[name] = np.ascontiguousarray(deq.T)  # [out, in] f32: what the checkpoint stands for
        if method == "compressed":  # [out, in] packed along in; zero points [out, groups] packed along out
            qt[stem + ".weight_packed"] = pack_cols(np.ascontiguousarray(q.T))
            qt[stem + ".weight_scale"] = np.ascontiguousarray(s.T)
            qt[stem + ".weight_shape"] = np.array(t.shape, np.int64)
            if not sym:
                qt[stem + ".weight_zero_point"] = pack_rows(np.ascontiguousarray(z.T))
            continue
        if method == "awq":
            qt[stem + ".qweight"], qt[stem + ".qzeros"] = pack_cols(q, AWQ_ORDER), pack_cols(z, AWQ_ORDER)
        else:
            qt[stem + ".qweight"] = pack_rows(q)
            qt[stem + ".qzeros"] = pack_cols(z - 1 if fmt == "gptq" else z)
            qt[stem + ".g_idx"] = (np.arange(q.shape[0]) // g).astype(np.int32)
        qt[stem + ".scales"] = np.ascontiguousarray(s)
    save_file(qt, os.path.join(out_dir, "model.safetensors"))
    save_file(ref, os.path.join(ref_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    if method == "compressed":
        w = {"num_bits": 4, "type": "int", "symmetric": sym, "dynamic": False, "actorder": None,
             "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group}
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                                                    "input_activations": None}},
                                      "ignore": ["lm_head"]}
    elif method == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"}
    else:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym,
                                      "desc_act": False, "checkpoint_format": fmt}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out_dir, ref_dir
