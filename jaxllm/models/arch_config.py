"""Per-architecture config fields beyond plain Llama: Phi-3 (partial rotary, longrope) and Granite
(embedding / residual / attention multipliers, logits scaling). `ModelConfig.from_hf` calls
`arch_fields` and `check_longrope`; the decoder reads the resulting ModelConfig fields.

- phi3 (Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini, `Phi3ForCausalLM`): `partial_rotary_factor` (RoPE on the
  first int(head_dim * factor) dims only, Phi-4-mini's 0.75), rope type `longrope` (HF also reads the
  older names "su" and "yarn" as longrope for phi3). The checkpoint's fused qkv_proj / gate_up_proj are
  split by the HF loader (checkpoints/hf_names.py) and re-fused shard-major by build_model.
- granite (`GraniteForCausalLM`): x = embed * embedding_multiplier; each residual branch is scaled by
  residual_multiplier before it is added; the softmax scale is attention_multiplier (not 1/sqrt(d));
  logits are divided by logits_scaling.
- qwen2 / qwen3 (dense): the sliding window (only with use_sliding_window) applies per layer as
  transformers 5 does: the config's `layer_types`, else "sliding_attention" on layers >=
  max_window_layers (default 28); qwen2_moe: the even layers below max_window_layers (HF's
  Qwen2MoeConfig). vLLM refuses such a mix (max_window_layers < num_hidden_layers); jaxllm runs it
  through the per-layer window Gemma 2/3 use. Qwen3-MoE: every layer (HF's).
"""
from __future__ import annotations

import math
from typing import Any

GRANITE_FIELDS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
_LONGROPE_ALIASES = ("su", "yarn")  # HF's Phi3Config reads both as longrope


def _number(value, name: str, source: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise _error(f"{source}: {name}={value!r} must be a finite number > 0")
    return float(value)


def _error(msg: str):
    from jaxllm.models.config import ModelConfigError

    return ModelConfigError(msg)


def arch_fields(model_type: str, cfg: dict[str, Any], rope: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig keyword fields for `model_type` read from the HF config `cfg`. Pops
    `partial_rotary_factor` from `rope` (transformers 5 keeps a copy in rope_parameters) and, for
    phi3, renames the rope type aliases to "longrope" in place."""
    out: dict[str, Any] = {}
    partial = rope.pop("partial_rotary_factor", None)
    partial = cfg.get("partial_rotary_factor", partial)
    if partial is not None and partial != 1.0:
        if model_type != "phi3":
            raise _error(f"{source}: partial_rotary_factor={partial!r} is not supported for model_type="
                         f"{model_type!r} (only phi3 rotates part of head_dim)")
        partial = _number(partial, "partial_rotary_factor", source)
        if partial > 1.0:
            raise _error(f"{source}: partial_rotary_factor={partial!r} must be in (0, 1]")
        out["partial_rotary_factor"] = partial
    if model_type == "phi3":
        kind = rope.get("rope_type", rope.get("type"))
        if kind in _LONGROPE_ALIASES:
            rope["rope_type"] = "longrope"
            rope.pop("type", None)
    if model_type == "granite":
        for name in GRANITE_FIELDS:
            if cfg.get(name) is not None:
                out[name] = _number(cfg[name], name, source)
        out.setdefault("attention_multiplier", 1.0)  # HF GraniteConfig's default: the scale is never 1/sqrt(d)
    else:
        given = [n for n in GRANITE_FIELDS if cfg.get(n) not in (None, 1.0)]
        if given:
            raise _error(f"{source}: {given[0]}={cfg[given[0]]!r} is only supported for model_type 'granite' "
                         f"(got {model_type!r})")
    return out


def check_longrope(rope: dict[str, Any], cfg: dict[str, Any], rotary_dim: int, source: str) -> None:
    """Fills and checks a longrope scaling dict in place as HF's `_compute_longrope_parameters` reads
    it: short_factor / long_factor lists of rotary_dim // 2 numbers (stored as tuples: the config is
    hashable), original_max_position_embeddings (top level wins, as HF's Phi3Config keeps it there),
    attention_factor (HF's default: sqrt(1 + ln(factor) / ln(original)), factor defaulting to
    max_position_embeddings / original)."""
    half = rotary_dim // 2
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, (list, tuple)) or len(v) != half or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
            shown = v if not isinstance(v, (list, tuple)) else f"a list of {len(v)}"
            raise _error(f"{source}: rope_scaling.{key}={shown!r} must be a list of {half} numbers > 0 "
                         f"(rotary_dim // 2)")
        rope[key] = tuple(float(x) for x in v)
    for key in ("short_mscale", "long_mscale"):
        if key in rope:
            raise _error(f"{source}: rope_scaling.{key}={rope[key]!r} is not supported (HF reads "
                         f"rope_scaling.attention_factor)")
    old_len = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    old_len = old_len or cfg.get("max_position_embeddings", 4096)
    if isinstance(old_len, bool) or not isinstance(old_len, int) or old_len <= 1:
        raise _error(f"{source}: original_max_position_embeddings={old_len!r} must be an integer > 1")
    rope["original_max_position_embeddings"] = old_len
    factor = rope.get("factor")
    factor = cfg.get("max_position_embeddings", 4096) / old_len if factor is None else \
        _number(factor, "rope_scaling.factor", source)
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    rope["attention_factor"] = _number(attention, "rope_scaling.attention_factor", source)


def long_prompt_threshold(config, max_model_len: int) -> int | None:
    """The prompt length past which a prompt's KV is written differently, or None. longrope
    (jaxllm/models/rope.py): a prompt longer than original_max_position_embeddings writes every key
    with the long set, a shorter one the keys before that length with the short set; the prefix
    cache keys its blocks on the side (jaxllm/core/kv_cache_manager.py). None when max_model_len
    keeps every sequence within the original length (always the short set) or the model is no
    longrope one."""
    s = (config.rope_scaling_dict if config is not None else None) or {}
    if s.get("rope_type") != "longrope" or max_model_len <= s["original_max_position_embeddings"]:
        return None
    return int(s["original_max_position_embeddings"])


QWEN_WINDOWED = ("qwen2", "qwen3", "qwen2_moe")


def qwen_windows(model_type: str, cfg: dict[str, Any], window: int | None,
                 source: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of a qwen2 / qwen3 config whose window is `window` (None unless
    use_sliding_window), as HF's Qwen2Config / Qwen3Config / Qwen2MoeConfig derive them: the config's
    `layer_types`, else layers >= max_window_layers (default 28) sliding (qwen2_moe: the even layers
    below it). Every layer alike: layer_types None (a
    window on all layers, or none), so the layer loop may still scan; others are left as given."""
    if model_type not in QWEN_WINDOWED or window is None:
        return window, None
    from jaxllm.models.gemma_config import check_layer_types

    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise _error(f"{source}: max_window_layers={first!r} must be an integer >= 0")
        if model_type == "qwen2_moe":
            types = ["sliding_attention" if i % 2 == 0 and i < first else "full_attention" for i in range(n)]
        else:
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    types = check_layer_types(types, n, source)
    if len(set(types)) == 1:
        return (window if types[0] == "sliding_attention" else None), None
    return window, types
