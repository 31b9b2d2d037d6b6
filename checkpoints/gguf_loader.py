"""GGUF files (llama.cpp): weights, model config and tokenizer from the metadata. Q8_0 projections
stay int8 with their block scales, Q4_0 / Q4_1 ones 4-bit (checkpoints/gguf_quant.py); every other
tensor is dequantized to fp32 (all of a Mixtral's: its GGUF experts and attention are not kept quantized). One log line at load
says what happened to each tensor type."""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter

import numpy as np

from checkpoints import conversion_cache
from checkpoints.assemble import assemble_params
from checkpoints.errors import CheckpointError
from checkpoints.gguf_quant import assemble_quantized, kept_projections, kept_summary
from checkpoints.hf_names import llama_names
from jaxllm.models.config import ModelConfig, ModelConfigError

# llama.cpp architecture → HF model_type (only those the Llama-family decoder covers).
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "granite": "granite", "gemma2": "gemma2", "gemma3": "gemma3_text"}
# llama.cpp permutes Q/K rows for these architectures (interleaved rotary); others keep HF order.
PERMUTED_ARCHS = {"llama", "mistral", "granite"}  # convert_hf_to_gguf's GraniteModel is a LlamaModel
# granite's µP scalars: llama.cpp metadata key (after "granite.") → HF config field (same meaning:
# logit_scale divides the logits, attention.scale is the softmax scale)
_GRANITE_KEYS = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                 "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"}
log = logging.getLogger("jaxllm.checkpoints")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Mixtral (general.architecture llama with expert_count): the router and the experts stacked [X, out, in]
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "ffn_gate_exps.weight": "block_sparse_moe.experts.gate_exps",
    "ffn_up_exps.weight": "block_sparse_moe.experts.up_exps",
    "ffn_down_exps.weight": "block_sparse_moe.experts.down_proj",
}
# phi3 keeps HF's fused tensors: attn_qkv (q, k, v rows) and ffn_up (gate, then up rows; llama.cpp's
# swiglu halves), split under Llama's names by checkpoints/hf_names.py as for an HF Phi-3 checkpoint
_PHI3_NAMES = {**_LAYER_NAMES, "attn_qkv.weight": "self_attn.qkv_proj.weight",
               "ffn_up.weight": "mlp.gate_up_proj.weight"}
# Gemma 2 / 3 (convert_hf_to_gguf.py's Gemma2Model / Gemma3Model): the sandwich norms under llama.cpp's names
# (ffn_norm is the MLP's input norm, HF's pre_feedforward_layernorm), every *norm.weight stored as 1 + w (HF
# scales by 1 + w: the loader subtracts the 1 again)
_GEMMA_NAMES = {**_LAYER_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
GEMMA_GGUF = ("gemma2", "gemma3")
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def open_gguf(path: str):
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path: str) -> ModelConfig:
    return _config_from(_hf_config(reader, path), path)


def _hf_config(reader, path: str) -> dict:
    """The HF-style config dict the GGUF metadata implies (what ModelConfig.from_hf takes)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"{path}: unsupported architecture general.architecture={arch!r} "
                              f"(supported: {', '.join(sorted(GGUF_ARCHS))})")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(f"{path}: rope_freqs (Llama 3.1 rope scaling in GGUF) is not supported; "
                              "load the HF checkpoint instead")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    experts = g("expert_count")
    names = {t.name for t in reader.tensors}
    if arch == "phi3" and names & {"rope_factors_long.weight", "rope_factors_short.weight"}:
        raise CheckpointError(f"{path}: rope_factors_long/rope_factors_short (Phi-3 longrope in GGUF) are not "
                              "supported; load the HF checkpoint instead")
    if experts and (arch != "llama" or "blk.0.ffn_gate_exps.weight" not in names):
        why = (f"general.architecture={arch!r}" if arch != "llama" else
               "its experts are not stacked (blk.N.ffn_gate_exps: re-convert with a current llama.cpp)")
        raise CheckpointError(f"{path}: {arch}.expert_count={experts} (a mixture-of-experts GGUF) is not supported: "
                              f"{why}; only Mixtral's llama layout loads")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size") or (len(tokens.data) if tokens is not None else None)
    heads = g("attention.head_count")
    hf = {
        "model_type": GGUF_ARCHS[arch],
        "vocab_size": vocab,
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length") or g("rope.dimension_count"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "sliding_window": g("attention.sliding_window"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling, "factor": g("rope.scaling.factor", 1.0)}
        if scaling == "yarn":
            hf["rope_scaling"]["factor"] = float(hf["rope_scaling"]["factor"])
            hf["rope_scaling"].update(_yarn_keys(g, f"{path}: {arch}.rope.scaling"))
    if arch in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if arch == "granite":
        hf.update({field: g(key) for key, field in _GRANITE_KEYS.items() if g(key) is not None})
    if arch == "phi3":  # llama.cpp writes the rotated dims (partial_rotary_factor * head_dim) as the rope dims
        per_head = hf["hidden_size"] // heads if hf["hidden_size"] and heads else None
        hf["head_dim"] = g("attention.key_length") or per_head
        rot = g("rope.dimension_count")
        if rot and hf["head_dim"] and rot != hf["head_dim"]:
            hf["partial_rotary_factor"] = rot / hf["head_dim"]
    if arch in GEMMA_GGUF:
        hf.update(_gemma_keys(arch, g, hf))
    if experts:  # Mixtral: feed_forward_length is each expert's
        hf.update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=g("expert_used_count", 2))
    missing = [k for k, v in hf.items() if v is None and k not in ("sliding_window", "bos_token_id", "eos_token_id")]
    if missing:
        raise CheckpointError(f"{path}: GGUF metadata lacks {', '.join(missing)} for architecture {arch}")
    return hf


# llama.cpp's model size by block count whose softmax scale is (hidden / heads) ** -0.5, not head_dim ** -0.5
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_keys(arch: str, g, hf: dict) -> dict:
    """The Gemma 2 / 3 config fields as llama.cpp reads its own files (llama-model.cpp): the query scale from
    the layer count (27B: query_pre_attn_scalar = hidden / heads, else head_dim; the converter writes no key
    for it), the soft-caps (Gemma 2 only; absent: HF's and llama.cpp's defaults 50 / 30), the window
    (absent: 4096), the sliding layers' rope base (rope.freq_base_swa, else 10000). The layer pattern is
    llama.cpp's fixed one, HF's default (Gemma 2: every other layer from 0; Gemma 3: 5 sliding, 1 full)."""
    heads, embd = hf["num_attention_heads"], hf["hidden_size"]
    big = hf["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch] and heads and embd
    out = {"query_pre_attn_scalar": embd // heads if big else hf["head_dim"]}
    if hf.get("sliding_window") is None:
        del hf["sliding_window"]  # HF's default (4096) fills it
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if g(key) is not None:
                out[key] = float(g(key))
    else:
        out["rope_local_base_freq"] = float(g("rope.freq_base_swa", 10000.0))
    return out


# llama.cpp's yarn keys (convert_hf_to_gguf.py writes them from the HF rope parameters) → HF's names
_YARN_KEYS = {"original_context_length": "original_max_position_embeddings",
              "yarn_attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
# keys HF's yarn has no equivalent for: refused unless neutral (llama.cpp reads an ext factor < 0 as 1)
_YARN_NEUTRAL = {"yarn_ext_factor": (1.0, -1.0), "yarn_log_multiplier": (0.0,), "attn_factor": (1.0,)}


def _yarn_keys(g, where: str) -> dict:
    """The HF rope_scaling entries of a GGUF's yarn metadata (`where`: file and key prefix, for errors)."""
    out = {hf: (int if hf.startswith("original") else float)(g(f"rope.scaling.{k}"))
           for k, hf in _YARN_KEYS.items() if g(f"rope.scaling.{k}") is not None}
    for k, neutral in _YARN_NEUTRAL.items():
        v = g(f"rope.scaling.{k}")
        if v is not None and float(v) not in neutral:
            raise CheckpointError(f"{where}.{k}={float(v)!r} is not supported with yarn (only {neutral[0]})")
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation: per head, rows were interleaved (pairs) from two halves."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_from(hf: dict, path: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf, source=path)
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None


def load_gguf(path: str, dtype=np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and stacked params: Q8_0 / Q4_0 / Q4_1 projections as QuantWeights of numpy arrays
    (int8 / int4 / uint4 q, f16 block scales, Q4_1's f16 offsets), the rest in `dtype`. A conversion
    cache hit (checkpoints.conversion_cache) skips the GGUF parse (5 s of pure Python for SmolLM2's
    metadata) and any dequantization; kept-quantized projections are cached as they are."""
    from jaxllm.models.quant import QuantWeight

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    hit = conversion_cache.load(path)
    if hit is not None:
        hf, params = hit
        log.info("%s: loaded from the conversion cache (converted earlier)", path)
        return _config_from(hf, path), {k: v if isinstance(v, QuantWeight) else v.astype(dtype, copy=False)
                                        for k, v in params.items()}
    reader = open_gguf(path)
    # Through JSON either way, so a cache hit builds exactly the config a conversion does.
    hf = json.loads(json.dumps(_hf_config(reader, path), default=lambda o: o.item()))
    config = _config_from(hf, path)
    params = _convert(reader, config, path)
    conversion_cache.save(path, hf, params)
    return config, {k: v if isinstance(v, QuantWeight) else v.astype(dtype, copy=False) for k, v in params.items()}


def _convert(reader, config: ModelConfig, path: str) -> dict:
    """Params in jaxllm's stacked layout: kept Q8_0 projections as QuantWeights, the rest fp32."""
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    tensors = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        layer_names = _PHI3_NAMES if arch == "phi3" else _GEMMA_NAMES if arch in GEMMA_GGUF else _LAYER_NAMES
        hf_name = (f"model.layers.{m.group(1)}.{layer_names.get(m.group(2), m.group(2))}" if m
                   else _GLOBAL_NAMES.get(t.name, t.name))
        tensors[hf_name] = t
    kept = {} if config.is_moe else kept_projections(tensors, config)  # MoE: dequantized (no GGUF expert blocks kept)
    quantized = assemble_quantized(config, tensors, kept, _unpermute if arch in PERMUTED_ARCHS else None, path)
    deq = Counter()

    def get(name: str):
        if name.endswith("experts.gate_up_proj"):  # [X, 2F, E], as assemble.moe_params reads it
            parts = [get(name.replace("gate_up_proj", p)) for p in ("gate_exps", "up_exps")]
            return None if parts[0] is None else np.concatenate(parts, axis=1)
        t = tensors.get(name)
        if t is None:
            return None
        deq[t.tensor_type.name] += 1
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} is corrupt or truncated ({e})") from None
        w = np.asarray(w, dtype=np.float32)
        if arch in GEMMA_GGUF and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # stored 1 + w; the model scales by 1 + w itself (config.norm_offset)
        if arch in PERMUTED_ARCHS and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            w = _unpermute(w, heads)
        return w

    get = llama_names(config, get, path)  # phi3's fused attn_qkv / ffn_up split (checkpoints/hf_names.py)
    params = assemble_params(config, get, source=path, dtype=np.float32, skip=frozenset(quantized))
    params.update(quantized)
    kept_msg = (f"kept quantized with block-32 scales: {kept_summary(tensors, kept, config.num_layers)} "
                f"({', '.join(sorted(quantized))}); "
                if quantized else "")
    deq_msg = ", ".join(f"{k} x {v}" for k, v in sorted(deq.items())) or "none"
    log.info("%s: %sdequantized to fp32: %s", path, kept_msg, deq_msg)
    return params
