"""Tiny fp8 HF checkpoints written by the tests themselves: fp32 random Llama weights quantized with
numpy / ml_dtypes into the compressed-tensors and "fp8" (AutoFP8 / FineGrainedFP8) layouts, and the
same weights dequantized in numpy into a plain fp32 checkpoint (the independent reference)."""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from tests.parallel.tiny_llama import random_weights

F8 = ml_dtypes.float8_e4m3fn
# E 256 / F 320 / head_dim 64: [128, 128] blocks with partial ones (320 = 2.5 x 128) and o_proj's
# input blocks split per head (head_dim 64 < 128)
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=256,
              intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def fp32_weights(seed: int = 0, cfg: dict = CONFIG) -> dict[str, np.ndarray]:
    return random_weights(cfg, seed, std=0.08, lm_head_std=0.15)


def quantize(w: np.ndarray, strategy: str, block=(128, 128), scale_dtype=np.float32
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [out, in] f32 → (q float8_e4m3fn, the stored scale, the dequantized f32 weight): scale =
    absmax / 448 per tensor ([1]), per output row ([out, 1]) or per [bo, bi] block ([ceil(out/bo), ceil(in/bi)]),
    rounded to `scale_dtype` (bf16 / f16 scales) before q is computed."""
    out_dim, in_dim = w.shape
    if strategy == "tensor":
        s = np.array([np.abs(w).max() / 448.0], np.float32)
        full = np.full_like(w, s[0])
    elif strategy == "channel":
        s = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(np.float32)  # [out, 1]
        full = np.broadcast_to(s, w.shape)
    else:
        bo, bi = block
        nbo, nbi = -(-out_dim // bo), -(-in_dim // bi)
        s = np.zeros((nbo, nbi), np.float32)
        for r in range(nbo):
            for c in range(nbi):
                s[r, c] = np.abs(w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]).max() / 448.0
        full = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)[:out_dim, :in_dim]
    if scale_dtype != np.float32:
        s = s.astype(scale_dtype)
        full = np.asarray(full, np.float32).astype(scale_dtype).astype(np.float32)
    q = (w / full).astype(F8)
    return q, s, q.astype(np.float32) * full


def write_dir(path: str, tensors: dict, cfg: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def make_fp8(root: str, name: str, qconfig: dict, strategy: str, *, block=(128, 128), skip=(),
             quantize_extra=(), kv_scales: dict | None = None, input_scale: bool = False, seed: int = 0,
             cfg: dict = CONFIG, replace: dict | None = None, scale_dtype=np.float32,
             scale_shape=None) -> tuple[str, str]:
    """Writes (fp8 checkpoint dir, its numpy-dequantized fp32 reference dir). `skip`: full tensor
    names left in full precision (an ignore list); `quantize_extra`: other weights quantized too
    (embeddings, the LM head); `kv_scales`: {"self_attn.k_scale": [L] values, ...} per layer;
    `replace`: tensors written to the fp8 file instead of the computed ones (damaged checkpoints);
    `scale_dtype`: the stored scales' dtype; `scale_shape(s)`: the stored scale's shape from quantize's."""
    t = fp32_weights(seed, cfg)
    fp8, ref = {}, {}
    names = [f"model.layers.{i}.{lin}.weight" for i in range(cfg["num_hidden_layers"]) for lin in LINEARS]
    scale_key = "weight_scale_inv" if qconfig.get("quant_method") == "fp8" and strategy == "block" else "weight_scale"
    for n, w in t.items():
        if (n in names and n not in skip) or n in quantize_extra:
            q, s, deq = quantize(w, strategy, block, scale_dtype)
            fp8[n] = q
            fp8[n[:-len("weight")] + scale_key] = s if scale_shape is None else s.reshape(scale_shape(s))
            if input_scale:
                fp8[n[:-len("weight")] + "input_scale"] = np.array([0.05], np.float32)
            ref[n] = deq
        else:
            fp8[n] = ref[n] = w
    for key, vals in (kv_scales or {}).items():
        for i, v in enumerate(vals):
            fp8[f"model.layers.{i}.{key}"] = np.asarray(v, np.float32)
    fp8.update(replace or {})
    fp8 = {k: v for k, v in fp8.items() if v is not None}  # replace={name: None} removes a tensor
    fp8_dir = write_dir(os.path.join(root, name), fp8, dict(cfg, quantization_config=qconfig))
    return fp8_dir, write_dir(os.path.join(root, name + "-ref"), ref, cfg)


def ct_config(strategy: str, dynamic_acts: bool | None, block=(128, 128), ignore=("lm_head",)) -> dict:
    """A compressed-tensors quantization_config: "FP8" (static per-tensor activations), "FP8_DYNAMIC"
    (dynamic per-token) or weights only (dynamic_acts None)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": list(block) if strategy == "block" else None,
               "observer": "minmax"}
    acts = None if dynamic_acts is None else {
        "num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic_acts,
        "strategy": "token" if dynamic_acts else "tensor"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}},
            "ignore": list(ignore), "kv_cache_scheme": None}
