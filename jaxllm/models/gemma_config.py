"""Google Gemma config fields (host side, no jax): Gemma 2 (`gemma2`, `Gemma2ForCausalLM`), as
transformers 5 reads it. `ModelConfig.from_hf` calls `hf_defaults` (HF's defaults for the fields a Gemma
config.json may leave out) and `gemma_fields`; the decoder reads the resulting ModelConfig fields.

RMSNorm weight used as (1 + w) (`norm_offset`: the model computes it, in f32 before the
cast as HF does; folding the +1 into a bf16 weight would round 1 + w to bf16's 2^-7 steps near 1, so it
is not folded), embeddings times sqrt(hidden_size) (`embedding_multiplier`; the model multiplies in
its dtype, as HF casts the normalizer), GELU-tanh MLP (`hidden_act` "gelu_tanh"), tied embeddings.
Softmax scale query_pre_attn_scalar ** -0.5 (`attention_multiplier`), sandwich norms
(`sandwich_norms`: HF's post_attention_layernorm normalises the attention output, pre/post_feedforward
_layernorm wrap the MLP), `layer_types` (sliding-window or full attention per layer), attention and
final logit soft-capping (defaults 50 / 30).
"""
from __future__ import annotations

import math
from typing import Any

GEMMA_ARCHITECTURES = ("gemma2",)
LAYER_TYPES = ("sliding_attention", "full_attention")
GEMMA_ONLY_FIELDS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")

_COMMON = dict(head_dim=256, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)
_V2 = dict(_COMMON, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096)
HF_DEFAULTS = {  # transformers 5's Gemma2Config defaults
    "gemma2": dict(_V2, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}


def _error(msg: str):
    from jaxllm.models.config import ModelConfigError

    return ModelConfigError(msg)


def hf_defaults(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with HF's defaults filled in for a Gemma model_type (fields absent, not null); others as given."""
    return {**HF_DEFAULTS[model_type], **cfg} if model_type in GEMMA_ARCHITECTURES else cfg


def _cap(cfg: dict, name: str, source: str) -> float | None:
    v = cfg.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise _error(f"{source}: {name}={v!r} must be a finite number > 0 or null")
    return float(v)


def gemma_fields(model_type: str, cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig keyword fields of a Gemma config (after `hf_defaults`); for any other model_type the
    Gemma-only fields are refused in one line when set."""
    if model_type not in GEMMA_ARCHITECTURES:
        given = [n for n in GEMMA_ONLY_FIELDS if cfg.get(n) is not None]
        if given:
            raise _error(f"{source}: {given[0]}={cfg[given[0]]!r} is only supported for model_type 'gemma2' "
                         f"(got {model_type!r})")
        return {}
    if cfg.get("use_bidirectional_attention"):
        raise _error(f"{source}: use_bidirectional_attention={cfg['use_bidirectional_attention']!r} is not "
                     f"supported (only causal attention)")
    act_name, act, ok = "hidden_activation", cfg.get("hidden_activation"), ("gelu_pytorch_tanh",)
    if act not in ok:
        raise _error(f"{source}: {act_name}={act!r} is not supported for model_type {model_type!r} "
                     f"(only {' / '.join(map(repr, ok))})")
    out: dict[str, Any] = dict(hidden_act="gelu_tanh", norm_offset=True,
                               embedding_multiplier=float(cfg["hidden_size"] ** 0.5))
    scalar = cfg.get("query_pre_attn_scalar")
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
        raise _error(f"{source}: query_pre_attn_scalar={scalar!r} must be a number > 0")
    out.update(attention_multiplier=float(scalar) ** -0.5, sandwich_norms=True,
               attn_logit_softcap=_cap(cfg, "attn_logit_softcapping", source),
               final_logit_softcap=_cap(cfg, "final_logit_softcapping", source),
               layer_types=_layer_types(model_type, cfg, source))
    return out


def _layer_types(model_type: str, cfg: dict, source: str) -> tuple[str, ...]:
    """Per layer "sliding_attention" / "full_attention": the config's `layer_types`, else HF's default
    pattern (every other layer sliding, the first one too)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if not isinstance(types, (list, tuple)) or len(types) != n:
        shown = f"a list of {len(types)}" if isinstance(types, (list, tuple)) else types
        raise _error(f"{source}: layer_types={shown!r} must list one type per layer (num_hidden_layers={n})")
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise _error(f"{source}: layer_types[{i}]={t!r} is not supported ({' / '.join(LAYER_TYPES)})")
    return tuple(types)


def layer_attention(config, i) -> int | None:
    """Layer `i`'s sliding window or None. Without layer_types every layer has the config's
    sliding_window (then `i` may be traced: a scan)."""
    if config.layer_types is None:
        return config.sliding_window
    return config.sliding_window if config.layer_types[i] == "sliding_attention" else None
