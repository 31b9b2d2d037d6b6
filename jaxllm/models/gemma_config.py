"""Google Gemma config fields (host side, no jax): Gemma 1 (`gemma`, `GemmaForCausalLM`), Gemma 2
(`gemma2`, `Gemma2ForCausalLM`) and Gemma 3 text (`gemma3_text`, `Gemma3ForCausalLM`), as transformers
5 reads them. `ModelConfig.from_hf` calls `hf_defaults` (HF's defaults for the fields a Gemma
config.json may leave out) and `gemma_fields`; the decoder reads the resulting ModelConfig fields.

All three: RMSNorm weight used as (1 + w) (`norm_offset`: the model computes it, in f32 before the
cast as HF does; folding the +1 into a bf16 weight would round 1 + w to bf16's 2^-7 steps near 1, so it
is not folded), embeddings times sqrt(hidden_size) (`embedding_multiplier`; the model multiplies in
its dtype, as HF casts the normalizer), GELU-tanh MLP (`hidden_act` "gelu_tanh"), tied embeddings.
Gemma 2 and 3: softmax scale query_pre_attn_scalar ** -0.5 (`attention_multiplier`), sandwich norms
(`sandwich_norms`: HF's post_attention_layernorm normalises the attention output, pre/post_feedforward
_layernorm wrap the MLP), `layer_types` (sliding-window or full attention per layer), attention and
final logit soft-capping (Gemma 2's defaults 50 / 30). Gemma 3: q/k RMSNorm, and the sliding layers'
own default rope of base `rope_local_base_freq` (`rope_local_theta`) while the full layers use
`rope_theta` with any rope scaling.
"""
from __future__ import annotations

import math
from typing import Any

GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
GEMMA_ONLY_FIELDS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "rope_local_base_freq")

_COMMON = dict(head_dim=256, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)
_V2 = dict(_COMMON, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096)
HF_DEFAULTS = {  # transformers 5's GemmaConfig / Gemma2Config / Gemma3TextConfig defaults
    "gemma": dict(_COMMON, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_V2, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_V2, final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, sliding_window_pattern=6, vocab_size=262_208,
                        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=131_072, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2),
}


def _error(msg: str):
    from jaxllm.models.config import ModelConfigError

    return ModelConfigError(msg)


def hf_defaults(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with HF's defaults filled in for a Gemma model_type (fields absent, not null); others as given."""
    return {**HF_DEFAULTS[model_type], **cfg} if model_type in GEMMA_ARCHITECTURES else cfg


def gemma3_text_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """A `gemma3` (Gemma3ForConditionalGeneration, gemma-3-4b/12b/27b) config → its text model's config
    as a `gemma3_text` one: `text_config` over Gemma3TextConfig's defaults (hf_defaults), the composite's
    tie_word_embeddings (HF ties on it, default True) and, when set there, its eos / bos ids. The vision
    config is not read. HF's multimodal class never applies final_logit_softcapping (its ForCausalLM
    does, as vLLM does for both): a config that sets it is refused rather than guessed."""
    text = cfg.get("text_config")
    text = {} if text is None else text
    if not isinstance(text, dict):
        raise _error(f"{source}: text_config={text!r} must be an object (Gemma3TextConfig's fields)")
    kind = text.get("model_type", "gemma3_text")
    if kind != "gemma3_text":
        raise _error(f"{source}: text_config.model_type={kind!r} is not supported for model_type 'gemma3' "
                     f"(only 'gemma3_text')")
    if text.get("final_logit_softcapping") is not None:
        raise _error(f"{source}: text_config.final_logit_softcapping={text['final_logit_softcapping']!r} is not "
                     f"supported for model_type 'gemma3' (HF's Gemma3ForConditionalGeneration ignores it; only null)")
    out = hf_defaults("gemma3_text", dict(text, model_type="gemma3_text",
                                          architectures=cfg.get("architectures") or ["Gemma3ForConditionalGeneration"]))
    out["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    for key in ("eos_token_id", "bos_token_id"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def _cap(cfg: dict, name: str, source: str) -> float | None:
    v = cfg.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise _error(f"{source}: {name}={v!r} must be a finite number > 0 or null")
    return float(v)


def gemma_rope(model_type: str, cfg: dict[str, Any], rope: dict[str, Any], source: str) -> tuple[dict, float | None]:
    """→ (the full-attention layers' rope dict, the sliding layers' rope base or None). Gemma 3's
    transformers 5 `rope_parameters` is keyed by layer type ({"full_attention": {...},
    "sliding_attention": {...}}); older configs give rope_theta (+ rope_scaling) and rope_local_base_freq."""
    if model_type != "gemma3_text":
        return rope, None
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    else:
        full, local = rope, {}
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise _error(f"{source}: rope_parameters.sliding_attention.rope_type={kind!r} is not supported (only "
                     f"'default' for Gemma 3's sliding layers)")
    full.setdefault("rope_theta", cfg.get("rope_theta"))
    theta = local.get("rope_theta", cfg.get("rope_local_base_freq"))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise _error(f"{source}: rope_local_base_freq={theta!r} must be a number > 1")
    return full, float(theta)


def gemma_fields(model_type: str, cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig keyword fields of a Gemma config (after `hf_defaults`); for any other model_type the
    Gemma-only fields are refused in one line when set."""
    if model_type not in GEMMA_ARCHITECTURES:
        given = [n for n in GEMMA_ONLY_FIELDS if cfg.get(n) is not None]
        if given:
            raise _error(f"{source}: {given[0]}={cfg[given[0]]!r} is only supported for model_type 'gemma2' / "
                         f"'gemma3_text' (got {model_type!r})")
        return {}
    if cfg.get("use_bidirectional_attention"):
        raise _error(f"{source}: use_bidirectional_attention={cfg['use_bidirectional_attention']!r} is not "
                     f"supported (only causal attention)")
    if model_type == "gemma":  # HF's GemmaConfig reads the legacy "gelu" as the tanh approximation
        act_name, act, ok = "hidden_act", cfg.get("hidden_act"), ("gelu", "gelu_pytorch_tanh")
    else:
        act_name, act, ok = "hidden_activation", cfg.get("hidden_activation"), ("gelu_pytorch_tanh",)
    if act not in ok:
        raise _error(f"{source}: {act_name}={act!r} is not supported for model_type {model_type!r} "
                     f"(only {' / '.join(map(repr, ok))})")
    out: dict[str, Any] = dict(hidden_act="gelu_tanh", norm_offset=True,
                               embedding_multiplier=float(cfg["hidden_size"] ** 0.5))
    if model_type == "gemma":
        return out
    scalar = cfg.get("query_pre_attn_scalar")
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
        raise _error(f"{source}: query_pre_attn_scalar={scalar!r} must be a number > 0")
    out.update(attention_multiplier=float(scalar) ** -0.5, sandwich_norms=True,
               attn_logit_softcap=_cap(cfg, "attn_logit_softcapping", source),
               final_logit_softcap=_cap(cfg, "final_logit_softcapping", source),
               layer_types=_layer_types(model_type, cfg, source))
    if model_type == "gemma3_text":
        out["qk_norm"] = True
    return out


def _layer_types(model_type: str, cfg: dict, source: str) -> tuple[str, ...]:
    """Per layer "sliding_attention" / "full_attention": the config's `layer_types`, else HF's default
    pattern (Gemma 2: every other layer sliding, the first one too; Gemma 3: `sliding_window_pattern`
    - 1 sliding then one full)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        period = 2 if model_type == "gemma2" else cfg.get("sliding_window_pattern")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise _error(f"{source}: sliding_window_pattern={period!r} must be an integer >= 1")
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    return check_layer_types(types, n, source)


def check_layer_types(types, n: int, source: str) -> tuple[str, ...]:
    """`types` (a config's layer_types or a derived pattern) as a tuple of n LAYER_TYPES entries, or a
    one-line ModelConfigError naming the field (also used for Qwen2/Qwen3: arch_config.qwen_windows)."""
    if not isinstance(types, (list, tuple)) or len(types) != n:
        shown = f"a list of {len(types)}" if isinstance(types, (list, tuple)) else types
        raise _error(f"{source}: layer_types={shown!r} must list one type per layer (num_hidden_layers={n})")
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise _error(f"{source}: layer_types[{i}]={t!r} is not supported ({' / '.join(LAYER_TYPES)})")
    return tuple(types)


def layer_attention(config, i) -> tuple[int | None, bool]:
    """Layer `i`'s (sliding window or None, whether it uses the local rope table). Without layer_types
    every layer has the config's sliding_window and its one rope (then `i` may be traced: a scan)."""
    if config.layer_types is None:
        return config.sliding_window, False
    sliding = config.layer_types[i] == "sliding_attention"
    return (config.sliding_window if sliding else None), sliding and config.rope_local_theta is not None
