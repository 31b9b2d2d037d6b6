"""Writes tiny GGUF files the way llama.cpp's converter does (names, rotary permutation, quant types)
from a tiny HF safetensors model, so the GGUF loader can be checked against transformers."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate_exps": "ffn_gate_exps.weight",
    "block_sparse_moe.up_exps": "ffn_up_exps.weight", "block_sparse_moe.down_exps": "ffn_down_exps.weight",
}


# Gemma 2 / 3 as convert_hf_to_gguf.py's Gemma2Model / Gemma3Model name them (every *norm.weight written as 1 + w)
_GEMMA_GGUF_NAMES = {**_GGUF_NAMES, "post_attention_layernorm.weight": "post_attention_norm.weight",
                     "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                     "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                     "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}


def _stack_experts(tensors: dict, cfg: dict) -> dict:
    """HF Mixtral's experts.N.w1/w3/w2 [F, E] / [E, F] → llama.cpp's stacked gate/up/down_exps [X, ...]."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe."
        for hf, name in (("w1", "gate_exps"), ("w3", "up_exps"), ("w2", "down_exps")):
            out[p + name] = np.stack([tensors[f"{p}experts.{x}.{hf}.weight"] for x in range(cfg["num_local_experts"])])
    return out


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: per head, interleave the two rotary halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# phi3: llama.cpp keeps HF's fused tensors
_PHI3_GGUF_NAMES = {**_GGUF_NAMES, "self_attn.qkv_proj.weight": "attn_qkv.weight",
                    "mlp.gate_up_proj.weight": "ffn_up.weight"}


def write_gguf_from_hf(hf_dir: str, out_path: str, qtype: str = "F32", extra_f32: dict | None = None,
                       extra_tensors: dict | None = None) -> str:
    """`extra_f32`: more float32 metadata, {key suffix after the architecture: value}; `extra_tensors`:
    more f32 tensors by GGUF name."""
    import gguf

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["model_type"]
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    arch = {"mixtral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    gemma = arch in ("gemma2", "gemma3")
    w = gguf.GGUFWriter(out_path, arch)
    if cfg["model_type"] == "mixtral":
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if arch == "gemma3":  # the full layers' rope (the sliding layers' base is llama.cpp's fixed 10000)
        rope = dict(rope.get("full_attention", rope))
    if arch == "phi3":  # as convert_hf_to_gguf.py's Phi3MiniModel: no key length, the rotated dims, the window
        partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(partial * cfg["hidden_size"]) // heads)
        if cfg.get("sliding_window"):
            w.add_sliding_window(cfg["sliding_window"])
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if rope.get("rope_type") == "yarn":  # as llama.cpp's convert_hf_to_gguf.py writes it
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if rope.get("rope_type") == "linear":  # Gemma 3 4B+ (convert_hf_to_gguf.py's Gemma3Model)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if gemma:  # as Gemma2Model / Gemma3Model: the window; Gemma 2's soft-caps (no query scale: llama.cpp derives it)
        w.add_sliding_window(cfg["sliding_window"])
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "granite":  # as convert_hf_to_gguf.py's GraniteModel
        w.add_attention_scale(cfg["attention_multiplier"])
        w.add_embedding_scale(cfg["embedding_multiplier"])
        w.add_residual_scale(cfg["residual_multiplier"])
        w.add_logit_scale(cfg["logits_scaling"])
    for key, value in (extra_f32 or {}).items():
        w.add_float32(f"{arch}.{key}", value)
    w.add_vocab_size(cfg["vocab_size"])
    qt = gguf.GGMLQuantizationType[qtype]
    if cfg["model_type"] == "mixtral":  # llama.cpp writes Mixtral as llama with stacked experts
        tensors = _stack_experts(tensors, cfg)
    for name, t in sorted(tensors.items()):
        t = np.asarray(t, np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            names = _PHI3_GGUF_NAMES if arch == "phi3" else _GEMMA_GGUF_NAMES if gemma else _GGUF_NAMES
            gname = f"blk.{layer}.{names[rest]}"
            if arch in ("llama", "granite") and rest == "self_attn.q_proj.weight":
                t = llama_cpp_permute(t, heads)
            if arch in ("llama", "granite") and rest == "self_attn.k_proj.weight":
                t = llama_cpp_permute(t, kv)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if gemma and name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        if t.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(t, qt)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            w.add_tensor(gname, t)
    for gname, t in (extra_tensors or {}).items():
        w.add_tensor(gname, np.asarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def tiny_llama_hd32(root: str, heads: int = 4, kv_heads: int = 2, hidden: int = 64) -> str:
    """A tiny random HF llama with head_dim 32 (one Q8_0 block per head row of o_proj's input, so
    all seven projections are kept)."""
    import torch
    import transformers

    path = os.path.join(root, f"llama_hd32_{heads}h{kv_heads}kv{hidden}")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path
