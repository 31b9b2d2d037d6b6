"""A tiny random Llama (8 heads / 4 kv heads) written as an HF safetensors directory with numpy
(no torch): real random weights, so greedy decoding has clear margins and shards differ."""
from __future__ import annotations

import json
import os

import numpy as np

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_tiny_llama(root: str, seed: int = 0, **overrides) -> str:
    from safetensors.numpy import save_file

    cfg = dict(CONFIG, **overrides)
    path = os.path.join(root, f"tiny_llama_{seed}_{cfg['num_attention_heads']}h{cfg['num_key_value_heads']}kv")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    t = random_weights(cfg, seed)
    save_file(t, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def random_weights(cfg: dict, seed: int = 0, std: float = 0.15, lm_head_std: float = 0.3
                   ) -> dict[str, np.ndarray]:
    """HF-named fp32 random weights of a Llama config (projections ~ N(0, std))."""
    rng = np.random.default_rng(seed)
    E, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = E // H

    def w(*shape, std=std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, E, std=1.0), "model.norm.weight": 1 + w(E, std=0.1),
         "lm_head.weight": w(V, E, std=lm_head_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(E, std=0.1),
                  p + "post_attention_layernorm.weight": 1 + w(E, std=0.1),
                  p + "self_attn.q_proj.weight": w(H * D, E), p + "self_attn.k_proj.weight": w(K * D, E),
                  p + "self_attn.v_proj.weight": w(K * D, E), p + "self_attn.o_proj.weight": w(E, H * D),
                  p + "mlp.gate_proj.weight": w(F, E), p + "mlp.up_proj.weight": w(F, E),
                  p + "mlp.down_proj.weight": w(E, F)})
    return t
