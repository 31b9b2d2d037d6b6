"""Rotary position embeddings (HF "rotate half" convention) with default, linear, llama3, yarn,
dynamic (NTK) and longrope scaling, over the first `rotary_dim` dims of head_dim (Phi's
partial_rotary_factor; all of it otherwise).

- yarn (Qwen2.5/Qwen3 long-context configs, DeepSeek-style `mscale`/`mscale_all_dim`, gpt-oss's
  `truncate: false`): HF transformers' `_compute_yarn_parameters`: the inverse frequencies ramp from
  extrapolated (high frequencies) to interpolated (divided by `factor`) between the dimensions of
  `beta_fast` and `beta_slow` rotations over `original_max_position_embeddings`, and cos and sin are
  multiplied by the attention factor (`attention_factor`, else from `factor`, `mscale`, `mscale_all_dim`).
- dynamic: HF recomputes the NTK base in every forward from the sequence's length (unscaled up to
  `max_position_embeddings`). vLLM, whose behaviour jaxllm matches, scales once: the base HF would use at
  the longest sequence vLLM derives for the model, `max_position_embeddings * factor`, for every position
  (`base * (factor**2 - factor + 1) ** (d / (d - 2))`). Logits equal HF's for a sequence of exactly that
  length; shorter sequences differ from HF (not from vLLM).
- longrope (Phi-3 / Phi-3.5 / Phi-4-mini): two sets of inverse frequencies, base ones divided by
  `short_factor` or by `long_factor` (per dim), cos and sin times the attention factor. HF picks one
  set per forward from the batch's longest position (long when max(position) + 1 >
  `original_max_position_embeddings`); vLLM uses the long set for every token once max_model_len
  passes the original length. jaxllm picks per sequence and position: a token uses the long set when
  its sequence's prompt is longer than the original length, or its own position is at or past it
  (position + 1 > original). So a prompt uses one set for all its tokens, however it is chunked or
  preempted: HF's forward over that prompt, on either side of the threshold. A sequence whose prompt
  is short and that grows past the original length while decoding keeps its short-set keys (as in
  vLLM's old per-step rule), where HF generate (Phi3ForCausalLM.prepare_inputs_for_generation) drops
  its cache once and recomputes the whole sequence with the long set. The set that writes a key is a
  function of (prompt longer than the original length, position), so the prefix cache keys blocks on
  the first (jaxllm/core/kv_cache_manager.py, `long_prompt_threshold`; the position is in the hash
  chain already): a block written for a long prompt never serves a short one and vice versa.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxllm.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float64 inverse frequencies after any rope scaling."""
    return rope_parameters(config)[0]


def rope_parameters(config: ModelConfig) -> tuple[np.ndarray, float]:
    """→ (inverse frequencies [head_dim // 2] float64 after any rope scaling, the attention factor
    multiplying cos and sin: 1.0 except for yarn)."""
    d = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, interpolate between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv, config, scaling)
    if kind == "longrope":  # the short set; `longrope_tables` picks between both
        return inv / np.asarray(scaling["short_factor"], np.float64), float(scaling["attention_factor"])
    if kind == "dynamic":
        base = config.rope_theta * (factor * factor - (factor - 1)) ** (d / (d - 2))
        return 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d)), 1.0
    raise ValueError(f"rope_type={kind!r} is not supported")


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def longrope_long_frequencies(config: ModelConfig) -> np.ndarray:
    """[rotary_dim // 2] float64: longrope's long set (base inverse frequencies / long_factor)."""
    d, s = config.rotary_dim, config.rope_scaling_dict
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return inv / np.asarray(s["long_factor"], np.float64)


def rope_for_step(config: ModelConfig, positions: jnp.ndarray, metadata) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [T, rotary_dim // 2] f32 for a step's tokens (positions [T]); longrope picks its short
    or long set per token from its sequence's prompt length and its position (`metadata`:
    pallas_kernels AttentionMetadata, whose prompt_lens stand in for context_lens when None; see the
    module doc)."""
    inv, attention = rope_parameters(config)
    cos, sin = rope_tables(positions, inv, attention)
    s = config.rope_scaling_dict
    if not s or s["rope_type"] != "longrope":
        return cos, sin
    cos_l, sin_l = rope_tables(positions, longrope_long_frequencies(config), attention)
    original = s["original_max_position_embeddings"]
    lens = metadata.prompt_lens if metadata.prompt_lens is not None else metadata.context_lens  # [S]
    t = jnp.arange(positions.shape[0], dtype=jnp.int32)  # [T]
    seq = jnp.searchsorted(metadata.cu_q_lens, t, side="right") - 1  # [T] each token's sequence
    seq = jnp.clip(seq, 0, lens.shape[0] - 1)  # padding tokens past the last sequence
    long = ((lens[seq] > original) | (positions >= original))[:, None]  # [T, 1]
    return jnp.where(long, cos_l, cos), jnp.where(long, sin_l, sin)


def local_rope_for_step(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [T, rotary_dim // 2] f32 of Gemma 3's sliding layers: default rope of base
    `rope_local_theta` (no scaling; the full layers' rope_scaling is theirs alone)."""
    d = config.rotary_dim
    return rope_tables(positions, 1.0 / (config.rope_local_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)))


def _yarn(inv: np.ndarray, config: ModelConfig, s: dict) -> tuple[np.ndarray, float]:
    d, base = config.rotary_dim, config.rope_theta
    old_len = float(s["original_max_position_embeddings"])
    factor = s.get("factor")
    factor = config.max_position_embeddings / old_len if factor is None else float(factor)
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention = (_mscale(factor, mscale) / _mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else _mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_len
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [d/2]: 1 = interpolate
    return inv / factor * ramp + inv * (1.0 - ramp), float(attention)


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray,
                attention_factor: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin: [T, head_dim // 2] f32 for int positions [T], times `attention_factor` (yarn's)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [T, heads, head_dim]; rotates the two halves of the first 2 * cos.shape[-1] dims (HF
    convention; all of head_dim unless partial rotary), the rest pass through. Computed in f32."""
    half = cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:2 * half]
    c, s = cos[:, None, :], sin[:, None, :]
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]
    if 2 * half < x.shape[-1]:  # partial rotary: the rest of head_dim passes through
        parts.append(xf[..., 2 * half:])
    out = jnp.concatenate(parts, axis=-1)
    return out.astype(x.dtype)
