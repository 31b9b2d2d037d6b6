"""Random weights for any config, for benchmarking: uniform in ±1e-3, norms at 1 (Gemma's, scaling
by 1 + w, at 0).

Each parameter is drawn from its own key (base seed folded with a hash of its name) by a jitted
function with `out_shardings`, so weights are born already sharded and every shard agrees with
what a single device would have drawn.
"""
from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp

from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig
from jaxllm.models.llama_params import param_shapes

_LLAMA2 = dict(model_type="llama", vocab_size=32000, hidden_act="silu", max_position_embeddings=4096,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, eos_token_id=151645),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # microsoft/Phi-3-mini-4k-instruct: MHA, sliding window 2047 (fused qkv/gate_up in its checkpoint)
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=32000),
    # IBM Granite 3.x 8B (granite-3.3-8b-instruct's config.json): GQA, tied, µP multipliers
    "granite-3-8b": dict(model_type="granite", vocab_size=49159, hidden_size=4096, intermediate_size=12800,
                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=10000000.0,
                         tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                         attention_multiplier=0.0078125, logits_scaling=16.0, bos_token_id=0, eos_token_id=0),

    # google/gemma-2-9b: sandwich norms, every other layer a 4096-token window, soft-capping 50 / 30
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, max_position_embeddings=8192, rms_norm_eps=1e-6,
                       rope_theta=10000.0, bos_token_id=2, eos_token_id=1),
    # google/gemma-3-1b-it: MQA, q/k norms, 5 sliding (512, rope base 1e4) : 1 full (rope base 1e6) layers
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                       rope_theta=1000000.0, rope_local_base_freq=10000.0, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=[1, 106]),
    # google/gemma-3-27b-it's config.json (Gemma3ForConditionalGeneration: its text model, the rest of the
    # fields Gemma3TextConfig's defaults): GQA 32 / 16, head_dim 128, query_pre_attn_scalar 168, 1024 window
    "gemma-3-27b": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], eos_token_id=[1, 106],
                        text_config=dict(model_type="gemma3_text", hidden_size=5376, intermediate_size=21504,
                                         num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                                         head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                                         rope_scaling={"factor": 8.0, "rope_type": "linear"})),

    # Mixture of experts (jaxllm/models/moe.py).
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, tie_word_embeddings=False, eos_token_id=151645),
    # Tiny configs for tests and quick runs.
    "tiny-llama": dict(_LLAMA2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    # tiny-llama's decoder as a sequence classifier (3 labels) and as a cross-encoder reranker (1 label)
    "tiny-llama-classifier": dict(_LLAMA2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                  architectures=["LlamaForSequenceClassification"],
                                  id2label={"0": "negative", "1": "neutral", "2": "positive"}),
    "tiny-llama-reranker": dict(_LLAMA2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"}),
    "tiny-mixtral": dict(_LLAMA2, model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=2048),
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=256,
                           moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, max_position_embeddings=2048, rms_norm_eps=1e-6,
                           tie_word_embeddings=False, eos_token_id=2),
}


def dummy_config(spec: str) -> ModelConfig:
    """A preset name or a path to an HF config.json."""
    if spec in PRESETS:
        return ModelConfig.from_hf(PRESETS[spec], source=f"dummy preset {spec}")
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, "config.json")):
        path = spec if os.path.isfile(spec) else os.path.join(spec, "config.json")
        with open(path) as f:
            return ModelConfig.from_hf(json.load(f), source=path)
    raise CheckpointError(f"dummy model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path")


def dummy_params(config: ModelConfig, dtype, seed: int = 0, shardings: dict | None = None) -> dict[str, jax.Array]:
    out = {}
    for name, shape in param_shapes(config).items():
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        is_norm = name.endswith("norm")

        def draw(key, shape=shape, is_norm=is_norm):
            if is_norm:
                return jnp.full(shape, 0 if config.norm_offset else 1, dtype)
            # Drawn in the target dtype: an f32 draw + cast leaves an f32-sized hole per tensor in
            # the device allocator (13B bf16: ~20 GiB of holes, enough to fail the KV cache's
            # contiguous allocation later).
            return jax.random.uniform(key, shape, dtype, -1e-3, 1e-3)

        sharding = (shardings or {}).get(name)
        out[name] = jax.jit(draw, out_shardings=sharding)(key)
    return out
