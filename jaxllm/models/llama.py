"""One Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) as a Flax NNX module.

Per-layer weights are stacked on a leading "layers" axis and run with `lax.scan`, so compile time
does not grow with depth. Projections are stored input-major ([in, ...out]) with explicit head
axes so that tensor parallelism can shard by logical axis names (see `PARAM_AXES`).

Contract: `model(tokens, positions, kv_cache, metadata) -> (hidden, kv_cache)` over a flat ragged
batch (see pallas_kernels.metadata), and `model.compute_logits(hidden) -> f32 logits`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.models.config import ModelConfig
from jaxllm.models.projections import Projector
from jaxllm.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxllm.parallel.ops import constrain, embed_lookup, lm_logits, paged_attention
from pallas_kernels import AttentionMetadata, KVCache

# Logical axis names of every parameter; jaxllm/parallel maps them to mesh axes.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "layers.input_norm": ("layers", "norm"),
    "layers.post_norm": ("layers", "norm"),
    "layers.wq": ("layers", "embed", "heads", "head_dim"),
    "layers.wk": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.wv": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.bq": ("layers", "heads", "head_dim"),
    "layers.bk": ("layers", "kv_heads", "head_dim"),
    "layers.bv": ("layers", "kv_heads", "head_dim"),
    "layers.q_norm": ("layers", "head_dim"),
    "layers.k_norm": ("layers", "head_dim"),
    "layers.wo": ("layers", "heads", "head_dim", "embed"),
    "layers.w_gate": ("layers", "embed", "mlp"),
    "layers.w_up": ("layers", "embed", "mlp"),
    "layers.w_down": ("layers", "mlp", "embed"),
}
LAYER_PARAMS = tuple(k.split(".", 1)[1] for k in PARAM_AXES if k.startswith("layers."))


def param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The flat parameter names this config needs, with their shapes (loaders and dummy init use it)."""
    L, E, F, H, K, D, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                           c.num_kv_heads, c.head_dim, c.vocab_size)
    shapes = {
        "embed": (V, E), "final_norm": (E,),
        "layers.input_norm": (L, E), "layers.post_norm": (L, E),
        "layers.wq": (L, E, H, D), "layers.wk": (L, E, K, D), "layers.wv": (L, E, K, D),
        "layers.wo": (L, H, D, E),
        "layers.w_gate": (L, E, F), "layers.w_up": (L, E, F), "layers.w_down": (L, F, E),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (E, V)
    if c.attention_bias:
        shapes.update({"layers.bq": (L, H, D), "layers.bk": (L, K, D), "layers.bv": (L, K, D)})
    if c.qk_norm:
        shapes.update({"layers.q_norm": (L, D), "layers.k_norm": (L, D)})
    return shapes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in f32 like the reference implementation."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class DecoderLayers(nnx.Module):
    """Every decoder layer's weights, stacked on a leading [num_layers] axis."""

    def __init__(self, params: dict[str, jax.Array]):
        for name in LAYER_PARAMS:
            value = params.get(f"layers.{name}")
            setattr(self, name, nnx.Param(value) if value is not None else None)

    def stacked(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n)[...] for n in LAYER_PARAMS if getattr(self, n) is not None}


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, params: dict[str, jax.Array], *,
                 attention_impl: str | None = None, layout=None):
        """`layout`: a jaxllm.parallel.TPLayout when params are sharded on a mesh (config is then
        the layout's model_config), None on one device."""
        expected = param_shapes(config)
        missing = sorted(set(expected) - set(params))
        if missing:
            raise ValueError(f"parameters missing for {config.architecture}: {', '.join(missing)}")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"parameter {name}: shape {tuple(params[name].shape)} does not match "
                                 f"the config's {shape}")
        self.config = config
        self.attention_impl = attention_impl
        self.layout = layout
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None
        self.layers = DecoderLayers(params)

    @property
    def dtype(self):
        return self.embed[...].dtype

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 metadata: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [T] int32 → hidden [T, hidden_size] (after the final norm), updated cache."""
        c = self.config
        eps = c.rms_norm_eps
        lay = self.layout
        x = embed_lookup(self.embed[...], tokens, lay)  # [T, E]
        cos, sin = rope_tables(positions, inverse_frequencies(c))  # [T, D/2] f32
        scale = c.head_dim ** -0.5

        stacked = self.layers.stacked()
        proj = Projector(stacked, tokens.shape[0], lay)

        def layer(carry, w):
            x, cache, i = carry
            h = rms_norm(x, w["input_norm"], eps)  # [T, E]
            q = proj("te,ehd->thd", h, "wq", w["wq"], i)  # [T, H, D]
            k = proj("te,ehd->thd", h, "wk", w["wk"], i)  # [T, K, D]
            v = proj("te,ehd->thd", h, "wv", w["wv"], i)  # [T, K, D]
            if c.attention_bias:
                q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
            if c.qk_norm:
                q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            attn, cache = paged_attention(q, k, v, cache, i, metadata, lay, sm_scale=scale,
                                          sliding_window=c.sliding_window, impl=self.attention_impl)
            x = x + constrain(proj("thd,hde->te", attn, "wo", w["wo"], i), lay, ("tokens", "embed"))  # [T, E]
            h = rms_norm(x, w["post_norm"], eps)
            gate = proj("te,ef->tf", h, "w_gate", w["w_gate"], i)  # [T, F]
            up = proj("te,ef->tf", h, "w_up", w["w_up"], i)
            down = proj("tf,fe->te", jax.nn.silu(gate) * up, "w_down", w["w_down"], i)
            x = x + constrain(down, lay, ("tokens", "embed"))
            return (x, cache, i + 1), None

        (x, kv_cache, _), _ = jax.lax.scan(layer, (x, kv_cache, jnp.int32(0)), stacked)
        return rms_norm(x, self.final_norm[...], eps), kv_cache

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, E] → logits [N, vocab] f32."""
        if self.lm_head is None:
            return lm_logits(hidden, self.embed[...], self.layout, tied=True)
        return lm_logits(hidden, self.lm_head[...], self.layout, tied=False)


def build_model(config: ModelConfig, params: dict[str, np.ndarray | jax.Array], dtype,
                attention_impl: str | None = None, layout=None) -> LlamaForCausalLM:
    """Places params in `dtype` (norms included, as HF does): on the default device, or with a
    jaxllm.parallel.TPLayout into their shards (numpy straight from host memory; `params` is
    emptied as it goes). `config` is the checkpoint's config either way."""
    if layout is None:
        arrays = {k: jnp.asarray(v, dtype=dtype) for k, v in params.items()}
        return LlamaForCausalLM(config, arrays, attention_impl=attention_impl)
    arrays = layout.place_params(config, params, dtype)
    return LlamaForCausalLM(layout.model_config(config), arrays, attention_impl=attention_impl, layout=layout)
