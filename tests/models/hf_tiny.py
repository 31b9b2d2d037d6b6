"""Tiny random HF models of every supported architecture, saved by transformers as safetensors dirs."""
from __future__ import annotations

import os

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              rms_norm_eps=1e-6, initializer_range=0.1)

TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(COMMON, tie_word_embeddings=False)),
    "llama3_rope": ("LlamaConfig", dict(COMMON, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(COMMON, sliding_window=12, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=32, num_attention_heads=6, num_key_value_heads=3)),
}

# Mixture of experts (jaxllm/models/moe.py): Mixtral (top-2 of 4, renormalised, sliding_window null) and
# Qwen3-MoE (top-2 of 8, norm_topk_prob, an expert size of its own, qk-norm); not in TINY_CONFIGS (their
# own tests: tests/models/test_moe_parity_hf.py).
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=True)),
}

# Qwen2-MoE (top-2 of 8 without renormalising, a shared expert of 80 gated by sigmoid, qkv bias): its own
# tests (tests/models/test_qwen2_moe.py)
SHARED_MOE_CONFIGS = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, norm_topk_prob=False)),
}

# RoPE scaling types past the original length (tests/models/test_rope_scaling.py): yarn as Qwen2.5/Qwen3
# long-context configs write it, DeepSeek's mscale/mscale_all_dim, an explicit attention_factor with
# gpt-oss's truncate=False and custom betas; dynamic NTK (max_position_embeddings is its original length).
_ROPE_COMMON = dict(COMMON, max_position_embeddings=128)
ROPE_CONFIGS = {
    "qwen2_yarn": ("Qwen2Config", dict(_ROPE_COMMON, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
    "llama_yarn_mscale": ("LlamaConfig", dict(_ROPE_COMMON, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=1.0,
        mscale_all_dim=0.5))),
    "llama_yarn_attn_notrunc": ("LlamaConfig", dict(_ROPE_COMMON, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
        attention_factor=1.25, beta_fast=16.0, beta_slow=2.0, truncate=False))),
    "llama_dynamic": ("LlamaConfig", dict(COMMON, max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=4.0))),
}


# Phi-3, Granite and Qwen2's per-layer window (tests/models/test_archs_hf.py). phi3: fused qkv_proj / gate_up_proj, a sliding
# window and partial rotary (half of head_dim) with default rope; phi3_longrope: Phi-4-mini's shape
# (partial rotary 0.75, longrope, tied) with original length 32;
# granite: every multiplier away from 1, attention_multiplier far from 1/sqrt(head_dim).
_LONG = dict(short_factor=[1.0 + 0.2 * i for i in range(6)], long_factor=[1.0 + 3.0 * i for i in range(6)])
ARCH_CONFIGS = {
    "phi3": ("Phi3Config", dict(COMMON, sliding_window=12, partial_rotary_factor=0.5, pad_token_id=0)),
    "phi3_longrope": ("Phi3Config", dict(COMMON, max_position_embeddings=128, original_max_position_embeddings=32,
                                         partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0,
                                         rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, **_LONG))),
    "granite": ("GraniteConfig", dict(COMMON, embedding_multiplier=6.0, residual_multiplier=0.4,
                                      attention_multiplier=0.09, logits_scaling=2.5, tie_word_embeddings=True)),
    # qwen2_window: use_sliding_window with max_window_layers 1 of 3: layer 0 full, layers 1-2 a 12-token window
    "qwen2_window": ("Qwen2Config", dict(COMMON, num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True,
                                         sliding_window=12, max_window_layers=1)),
}

# Gemma (tests/models/test_gemma_hf.py). gemma2: head_dim 256 (Gemma's), every other layer a 12-token window
# (layer 0 sliding), query_pre_attn_scalar 144 (not head_dim), soft-caps small enough to bite on tiny random
# weights; gemma3: q/k norms, 2 sliding layers (window 12, rope base 1e4) then 1 full (rope base 1e6, linear 8),
# no soft-capping; gemma: Gemma 1 with the legacy hidden_act "gelu" (HF reads it as the tanh approximation).
# HF initialises Gemma's norm weights to 0 (a scale of 1 + 0): make_tiny_hf draws them, so the norms count.
_GEMMA = dict(COMMON, head_dim=256, pad_token_id=0)
GEMMA_CONFIGS = {
    "gemma2": ("Gemma2Config", dict(_GEMMA, sliding_window=12, query_pre_attn_scalar=144,
                                    attn_logit_softcapping=1.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(_GEMMA, num_hidden_layers=3, sliding_window=12, query_pre_attn_scalar=144,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                                rope_theta=1000000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=10000.0)})),
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=32, hidden_act="gelu", pad_token_id=0)),
}
# gemma3_mm: Gemma3ForConditionalGeneration (gemma-3-4b/12b/27b's class) around gemma3's text model and a tiny
# SigLIP vision tower (image tokens 253..255 inside the tiny vocab); jaxllm loads the text model only.
GEMMA_CONFIGS["gemma3_mm"] = ("Gemma3Config", dict(
    text_config=GEMMA_CONFIGS["gemma3"][1], boi_token_index=253, eoi_token_index=254, image_token_index=255,
    mm_tokens_per_image=4, vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                              patch_size=14)))

# The hybrid KV cache (tests/models/test_hybrid_kv_engine.py, test_sliding_kv_engine.py): Gemma 3's shape with 3
# sliding layers of an 8-token window per full one (4 KV cache groups of one layer each), short enough for
# block_size 4 to free blocks.
HYBRID_CONFIGS = {
    "gemma3_w8": ("Gemma3TextConfig", dict(GEMMA_CONFIGS["gemma3"][1], num_hidden_layers=4, sliding_window=8,
                                           layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    # all sliding (Mistral-7B-v0.1's shape: every layer one window): one sliding KV cache group of both layers
    "mistral_w8": ("MistralConfig", dict(COMMON, sliding_window=8, head_dim=16)),
}

# GGUF Gemma (tests/checkpoints/test_gguf.py): llama.cpp derives the query scale from the layer count (head_dim
# but for the 27B models) and writes no key for it, so these take query_pre_attn_scalar = head_dim (Gemma 2 2B /
# 9B, Gemma 3 1B-12B); Gemma 3 with 7 layers, so the full layer at 5 and a sliding one after it count.
GEMMA_GGUF_CONFIGS = {
    "gemma2_gguf": ("Gemma2Config", dict(GEMMA_CONFIGS["gemma2"][1], query_pre_attn_scalar=256)),
    "gemma3_gguf": ("Gemma3TextConfig", dict(GEMMA_CONFIGS["gemma3"][1], query_pre_attn_scalar=256, num_hidden_layers=7,
                                              layer_types=None)),
}


def make_tiny_hf(name: str, root: str, seed: int = 0) -> str:
    """Creates (once) and returns the directory of a tiny random HF model."""
    import torch
    import transformers

    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cls_name, kwargs = {**TINY_CONFIGS, **ROPE_CONFIGS, **ARCH_CONFIGS, **MOE_CONFIGS, **SHARED_MOE_CONFIGS,
                        **GEMMA_CONFIGS, **GEMMA_GGUF_CONFIGS, **HYBRID_CONFIGS}[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if cls_name.startswith("Gemma"):
        randomize_norms(model)
    model.save_pretrained(path)
    return path


def randomize_norms(model) -> None:
    """Gemma's norm weights drawn N(0, 0.3) in place: HF initialises them to 0 (a scale of 1 + 0), which
    would leave the (1 + w) norms unexercised."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0.0, 0.3)


def hf_logits(path: str, seqs: list[list[int]]):
    """Reference logits per sequence from transformers (PyTorch, fp32, eager attention)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    out = []
    with torch.no_grad():
        for s in seqs:
            out.append(model(torch.tensor([s])).logits[0].numpy())
    return out


def make_tiny_hf_embed(name: str, root: str, seed: int = 0, sentence_transformers: str | None = None) -> str:
    """A tiny random HF *base* model (LlamaModel, Qwen3Model, ...: architectures without
    "ForCausalLM", no lm_head, tensors named without the "model." prefix), the shape of e5-mistral
    or a Qwen3-Embedding export. `sentence_transformers`: "LAST" or "MEAN" also writes
    modules.json + 1_Pooling/config.json + a Normalize module, as sentence-transformers saves them."""
    import json

    import torch
    import transformers

    path = os.path.join(root, f"{name}-embed" + (f"-st{sentence_transformers}" if sentence_transformers else ""))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**dict(kwargs, tie_word_embeddings=False))
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config, dtype=torch.float32).save_pretrained(path)
    if sentence_transformers:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        with open(os.path.join(path, "modules.json"), "w") as f:
            json.dump(modules, f)
        os.makedirs(os.path.join(path, "1_Pooling"))
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": config.hidden_size,
                       "pooling_mode_mean_tokens": sentence_transformers == "MEAN",
                       "pooling_mode_lasttoken": sentence_transformers == "LAST",
                       "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}, f)
    return path


def hf_embeddings(path: str, seqs: list[list[int]], pooling_type: str, normalize: bool):
    """Reference embeddings from transformers (fp32, eager): last_hidden_state (after the final
    norm) of each sequence alone, pooled (LAST token or MEAN over tokens) and L2-normalised."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    out = []
    with torch.no_grad():
        for s in seqs:
            h = model(torch.tensor([s])).last_hidden_state[0]  # [n, E]
            v = h[-1] if pooling_type == "LAST" else h.mean(0)
            if normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out.append(v.numpy())
    return out


def make_tiny_hf_classifier(name: str, root: str, num_labels: int, seed: int = 0, tokenizer: bool = False,
                            **config_kw) -> str:
    """A tiny random HF ``*ForSequenceClassification`` (the decoder + a bias-free ``score`` linear
    [hidden, num_labels]) of a TINY_CONFIGS / GEMMA_CONFIGS architecture: reward models and cross-encoder
    rerankers are this shape (num_labels 1). ``tokenizer``: also save a word-level tokenizer whose pair
    encoding is ``<bos> a <sep> b <sep>`` (``tiny_pair_tokenizer``)."""
    import torch
    import transformers

    tag = "-".join(f"{k}{v}" for k, v in sorted(config_kw.items()))
    path = os.path.join(root, f"{name}-cls{num_labels}{'-tok' if tokenizer else ''}{'-' + tag if tag else ''}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cls_name, kwargs = {**TINY_CONFIGS, **GEMMA_CONFIGS}[name]
    labels = {i: f"label_{chr(97 + i)}" for i in range(num_labels)}
    config = getattr(transformers, cls_name)(**dict(kwargs, id2label=labels,
                                                    label2id={v: k for k, v in labels.items()}, **config_kw))
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)  # logits of a useful size (HF draws them at initializer_range)
    if name in GEMMA_CONFIGS:
        randomize_norms(model)
    model.save_pretrained(path)
    if tokenizer:
        tiny_pair_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def tiny_pair_tokenizer(vocab_size: int, words: tuple[str, ...] = ()):
    """A word-level fast tokenizer over ``vocab_size`` ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <sep>, 4 <unk>,
    then ``words`` (ids 5, 6, ...), then the words wN for the remaining ids N; single texts encode as
    ``<bos> a``, pairs as ``<bos> a <sep> b <sep>``."""
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>", *words]
    vocab = {t: i for i, t in enumerate(special)} | {f"w{i}": i for i in range(len(special), vocab_size)}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <sep> $B:1 <sep>:1", special_tokens=[("<bos>", 1), ("<sep>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token="<sep>")


def make_tiny_hf_reranker(name: str, root: str, seed: int = 0, **config_kw) -> str:
    """A tiny random HF ``*ForCausalLM`` (as ``make_tiny_hf``) with a word-level tokenizer whose words "no"
    and "yes" are ids 5 and 6 and "maybe" 7 (``tiny_pair_tokenizer``): the shape of an unconverted
    reranker (Qwen3-Reranker, bge-reranker-v2-gemma) that ``--hf-overrides`` with ``classifier_from_token``
    loads as a classifier."""
    import torch
    import transformers

    tag = "-".join(f"{k}{v}" for k, v in sorted(config_kw.items()))
    path = os.path.join(root, f"{name}-reranker{'-' + tag if tag else ''}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cls_name, kwargs = {**TINY_CONFIGS, **GEMMA_CONFIGS}[name]
    config = getattr(transformers, cls_name)(**dict(kwargs, **config_kw))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if name in GEMMA_CONFIGS:
        randomize_norms(model)
    model.save_pretrained(path)
    tiny_pair_tokenizer(config.vocab_size, words=("no", "yes", "maybe")).save_pretrained(path)
    return path


def hf_classifier_logits(path: str, seqs: list[list[int]]):
    """Reference logits [num_labels] per sequence from transformers' *ForSequenceClassification (fp32,
    eager attention, each sequence alone: its last token is the one scored)."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                            attn_implementation="eager")
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
