"""One Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 1/2/3 text;
Mixtral, Qwen3-MoE with moe.py's MLP) as a Flax NNX module.

Checkpoints hand over each per-layer weight stacked on a leading "layers" axis (`PARAM_AXES`, the
loaders' contract; llama_params.py holds the name and shape tables); the model keeps one array per
layer and runs the layers in a Python loop unrolled at trace time, so every matmul reads its weight
in place. (A `lax.scan` over the stacked arrays made XLA copy each layer's slice out before its
matmul: about 3x the weight bytes per decode step, bench/RESULTS.md.) Projections are stored
input-major ([in, ...out]) with explicit head axes so that tensor parallelism can shard by logical
axis names.

Contract: `model(tokens, positions, kv_cache, metadata) -> (hidden, kv_cache)` over a flat ragged
batch (see pallas_kernels.metadata), and `model.compute_logits(hidden) -> f32 logits`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.core.kv_cache_groups import KVCacheGroups, make_groups
from jaxllm.lora.delta import LoRABatch, with_lora
from jaxllm.models.config import ModelConfig
from jaxllm.models.fusion import FUSED_OUTPUTS, FUSED_PARTS, placement_plan, split_fused
from jaxllm.models.gemma_config import layer_attention
from jaxllm.models.llama_params import (  # noqa: F401 - PARAM_AXES, param_shapes: re-exported for tests and benches
    LAYER_PARAMS, MODEL_AXES, PARAM_AXES, model_param_shapes, param_shapes)
from jaxllm.models import prequantized, quant_dot
from jaxllm.models.moe import moe_mlp
from jaxllm.models.projections import IN_PLACE, Projector
from jaxllm.models.quant import (EXPERT_QUANT_PARAMS, QUANT_PARAMS, QuantWeight, check_backend, check_method,
                                 quantize, quantize_experts)
from jaxllm.models.rope import apply_rope, local_rope_for_step, rope_for_step
from jaxllm.parallel.ops import constrain, embed_lookup, lm_logits, paged_attention
from pallas_kernels import AttentionMetadata, KVCache

LAYER_LOOP_ENV = "JAXLLM_LAYER_LOOP"


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: bool = False) -> jax.Array:
    """RMSNorm over the last axis, computed in f32 like the reference implementation. `offset`
    (Gemma): scaled by (1 + weight) in f32 before the cast back, as HF's GemmaRMSNorm."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def layer_loop_mode(mode: str | None = None, config: ModelConfig | None = None) -> str:
    """"unroll" (one array per layer, a Python loop unrolled at trace time: every weight read in
    place) or "scan" (weights stacked [L, ...], `lax.scan`: one layer body to compile, but XLA copies
    each layer's weight slice before its matmuls; not on CPU for the projections of steps of <= 64
    tokens, read in place by the Projector: stacked_dot.py, quant_dot.py). `mode` or $JAXLLM_LAYER_LOOP, default "auto":
    unroll on accelerators (H200, Llama-2-13B bf16, batch-1 decode: unroll 7.69 ms/token = 83% of the
    weight-read roofline; scan 20.41 ms, also with XLA's dynamic-slice fusion; bench/RESULTS.md "GPU
    figures, 2026-12-04"), scan on CPU, where unrolling SmolLM2's 30 layers made warm-up ~8x longer
    for no measurable step gain (bench/RESULTS.md, "Layer loop"); the scan also compiles the 13B step
    in 4-12 s on the GPU against 37-58 s unrolled. An MoE `config` unrolls on CPU too: the
    scan's per-layer copy of the expert weights made a decode step 4-8x slower there (bench/RESULTS.md, "MoE").
    A config with `layer_types` (Gemma 2/3, Qwen2/3 with max_window_layers: each layer's window and
    rope are static, its own) always unrolls; "scan" is refused for it."""
    mode = mode or os.environ.get(LAYER_LOOP_ENV, "auto") or "auto"
    if mode not in ("auto", "unroll", "scan"):
        raise ValueError(f"{LAYER_LOOP_ENV}={mode!r} is invalid: must be one of auto, unroll, scan")
    if config is not None and config.layer_types is not None:  # Gemma 2/3, Qwen2/3: windows differ per layer
        if mode == "scan":
            raise ValueError(f"{LAYER_LOOP_ENV}=scan is not supported for model_type={config.architecture!r}: its "
                             f"layers differ (layer_types: sliding-window and full attention); use unroll or auto")
        return "unroll"
    if mode == "auto":
        return "scan" if jax.default_backend() == "cpu" and not (config is not None and config.is_moe) else "unroll"
    return mode


def decoder_layer(w: dict[str, jax.Array], x, cos, sin, cache: KVCache, index, metadata: AttentionMetadata,
                  c: ModelConfig, lay, proj: Projector, attn_kw: dict, window: int | None,
                  cache_slot: int | None = None):
    """One decoder layer: x [T, E] → (x [T, E], cache with this layer's k/v written at `index`).
    `w`: the layer's held weights by short name ("wqkv", ...), each the layer's own array or a slice.
    `attn_kw`: ragged_paged_attention's kernel choices (impl, mha_group), static.
    `window`: this layer's sliding window (None: full attention). `cache_slot` (hybrid KV cache): the
    page slot this layer reads and writes, with `metadata` its group's (None: page `index`)."""
    H, K = c.num_heads, c.num_kv_heads
    norm = lambda x, weight: rms_norm(x, weight, c.rms_norm_eps, c.norm_offset)  # noqa: E731
    h = norm(x, w["input_norm"])  # [T, E]
    qkv = proj("te,ehd->thd", h, "wqkv", w["wqkv"], index)  # [T, H+2K, D] shard-major (fusion.py)
    if c.attention_bias:
        qkv = qkv + w["bqkv"]
    q, k, v = split_fused(qkv, (H, K, K), lay, *FUSED_OUTPUTS["wqkv"])  # [T, H|K|K, D]
    if c.qk_norm:
        q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn, cache = paged_attention(q, k, v, cache, index if cache_slot is None else cache_slot, metadata, lay,
                                  scale_layer=None if cache_slot is None else index, sm_scale=c.attention_scale,
                                  sliding_window=window, soft_cap=c.attn_logit_softcap, **attn_kw)
    out = constrain(proj("thd,hde->te", attn, "wo", w["wo"], index), lay, ("tokens", "embed"))  # [T, E]
    if c.sandwich_norms:  # Gemma 2/3: the attention output normalised before the residual
        out = norm(out, w["attn_out_norm"])
    x = x + _residual(out, c)
    h = norm(x, w["post_norm"])
    if c.is_moe:  # [T, E]: each token's top-k experts (moe.py)
        down = moe_mlp(h, w["router"], w["we_gate_up"], w["we_down"], c.num_experts_per_tok, c.norm_topk_prob, lay)
        if c.shared_expert_intermediate_size:  # Qwen2-MoE: + sigmoid(h . gate) * the shared expert's MLP
            gate = jax.nn.sigmoid(jnp.einsum("te,e->t", h, w["shared_gate"]))[:, None]  # [T, 1]
            down = down + gate * _mlp(h, w, c, c.shared_expert_intermediate_size, lay, proj, index)
        return x + constrain(down, lay, ("tokens", "embed")), cache
    return x + _residual(_mlp(h, w, c, c.intermediate_size, lay, proj, index), c), cache


def _mlp(h: jax.Array, w: dict, c: ModelConfig, F: int, lay, proj: Projector, index) -> jax.Array:
    """The dense gated MLP (w_gate_up, w_down) of intermediate size F: h [T, E] → [T, E]. SiLU, or
    GELU-tanh (Gemma); Gemma 2/3 normalise its output (sandwich norms)."""
    gate_up = proj("te,ef->tf", h, "w_gate_up", w["w_gate_up"], index)  # [T, 2F] shard-major
    gate, up = split_fused(gate_up, (F,) * 2, lay, *FUSED_OUTPUTS["w_gate_up"])  # [T, F]
    act = jax.nn.silu(gate) if c.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)  # gelu_tanh: Gemma
    down = constrain(proj("tf,fe->te", act * up, "w_down", w["w_down"], index), lay, ("tokens", "embed"))  # [T, E]
    if c.sandwich_norms:
        down = rms_norm(down, w["mlp_out_norm"], c.rms_norm_eps, c.norm_offset)
    return down


def _residual(branch: jax.Array, c: ModelConfig) -> jax.Array:
    """A residual branch's output as added to x: times Granite's residual_multiplier."""
    return branch if c.residual_multiplier == 1.0 else branch * c.residual_multiplier


class LayerWeights(nnx.Module):
    """Decoder-layer weights by short name: one layer's own arrays ("unroll"), or every layer's
    stacked on a leading [num_layers] axis ("scan"). A quantized weight (QuantWeight) is held as
    two or three params, `name` (q), `name_scale` and `name_offset` (an asymmetric 4-bit weight's),
    and handed back as a QuantWeight."""

    def __init__(self, params: dict[str, jax.Array | QuantWeight]):
        for name in LAYER_PARAMS:
            value = params.get(name)
            scale = offset = None
            packed = None
            if isinstance(value, QuantWeight):
                packed = (value.packed, value.pack_axis) if value.packed else None
                value, scale, offset = value.q, value.scale, value.offset
            setattr(self, f"{name}_packed", packed)  # static: a 4-bit q held two a byte (quant_pack4.py)
            setattr(self, name, nnx.Param(value) if value is not None else None)
            setattr(self, f"{name}_scale", nnx.Param(scale) if scale is not None else None)
            setattr(self, f"{name}_offset", nnx.Param(offset) if offset is not None else None)

    def arrays(self) -> dict[str, jax.Array | QuantWeight]:
        out = {}
        for n in LAYER_PARAMS:
            if getattr(self, n) is None:
                continue
            scale, offset = getattr(self, f"{n}_scale"), getattr(self, f"{n}_offset")
            out[n] = getattr(self, n)[...] if scale is None else QuantWeight(
                getattr(self, n)[...], scale[...], None if offset is None else offset[...],
                *(getattr(self, f"{n}_packed") or ()))
        return out


def _per_layer(value, num_layers: int) -> list:
    """A stacked [L, ...] parameter (or an already split list of L arrays) → L per-layer arrays."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value[i] for i in range(num_layers)]


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, params: dict[str, jax.Array | list[jax.Array]], *,
                 attention_impl: str | None = None, layout=None, layer_loop: str | None = None):
        """`params`: the held (fused) names of `model_param_shapes(config)`, as `build_model` makes
        them from a checkpoint's; a "layers.*" value is either the stacked [L, ...] array or a list
        of L per-layer arrays (what `build_model` passes for "unroll"). `layout`: a
        jaxllm.parallel.TPLayout when params are sharded on a mesh (config is then the layout's
        model_config), None on one device. `layer_loop`: see `layer_loop_mode`."""
        expected = model_param_shapes(config)
        missing = sorted(set(expected) - set(params))
        if missing:
            unfused = sorted(set(params) & set(FUSED_PARTS))
            hint = f" (got unfused checkpoint params {', '.join(unfused)}: use build_model)" if unfused else ""
            raise ValueError(f"parameters missing for {config.architecture}: {', '.join(missing)}{hint}")
        L = config.num_layers
        for name, shape in expected.items():
            value = params[name]
            if isinstance(value, (list, tuple)):
                got = (len(value),) + (tuple(value[0].shape) if value else ())
                if any(tuple(v.shape) != shape[1:] for v in value):
                    got = (len(value), "mixed shapes")
            else:
                got = tuple(value.shape)
            if got != shape:
                raise ValueError(f"parameter {name}: shape {got} does not match the config's {shape}")
        self.config = config
        self.attention_impl = attention_impl
        self.layout = layout
        self.layer_loop = layer_loop_mode(layer_loop, config)
        held = [params.get(n) for n in (*QUANT_PARAMS, *EXPERT_QUANT_PARAMS)]  # an fp8 checkpoint may keep some
        held = [w[0] if isinstance(w, (list, tuple)) else w for w in held]
        self.quantization = next((w.method for w in held if isinstance(w, QuantWeight)), None)
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None
        self.score = nnx.Param(params["score"]) if "score" in params else None
        layer_params = {n: params[f"layers.{n}"] for n in LAYER_PARAMS if f"layers.{n}" in params}
        if self.layer_loop == "scan":
            self.layers = LayerWeights({n: v if not isinstance(v, (list, tuple))
                                        else jax.tree.map(lambda *a: jnp.stack(a), *v)  # QuantWeight too
                                        for n, v in layer_params.items()})
        else:
            per_layer = {n: _per_layer(v, L) for n, v in layer_params.items()}
            self.layers = nnx.List([LayerWeights({n: w[i] for n, w in per_layer.items()}) for i in range(L)])

    @property
    def dtype(self):
        return self.embed[...].dtype

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 metadata: AttentionMetadata, lora: LoRABatch | None = None, *,
                 decode_mha_group: int | None = None) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [T] int32 → hidden [T, hidden_size] (after the final norm), updated cache.
        `lora`: adapter slots and the per-token slot index (jaxllm/lora/delta.py); None = the base
        model only (the program is then exactly the one without LoRA). `decode_mha_group` (static, GPU
        Pallas attention): the decode kernel's head group (0 = the one-head kernel; the runner's choice at
        warm-up, runner/decode_tuning.py), None = the kernels' default (JAXLLM_DECODE_MHA_GROUP)."""
        c = self.config
        lay = self.layout
        x = embed_lookup(self.embed[...], tokens, lay)  # [T, E]
        if c.embedding_multiplier != 1.0:  # Granite; Gemma's sqrt(hidden_size), cast to x's dtype as HF does
            x = x * jnp.asarray(c.embedding_multiplier, x.dtype)
        ropes = (rope_for_step(c, positions, metadata),  # [T, rotary_dim/2] f32 cos, sin
                 local_rope_for_step(c, positions) if c.rope_local_theta is not None else None)  # Gemma 3 sliding
        stacked = self.layers.arrays() if self.layer_loop == "scan" else None
        proj = Projector(stacked, tokens.shape[0], lay, lora_onehot=None if lora is None else lora.onehot(x.dtype))

        attn_kw = {"impl": self.attention_impl}
        if decode_mha_group is not None:
            attn_kw["mha_group"] = decode_mha_group
        groups = None
        if metadata.group_slot_mapping is not None:  # hybrid KV cache: layer i is slot j of group g
            if self.layer_loop == "scan":
                raise ValueError("a hybrid KV cache needs the unrolled layer loop (its layers differ)")
            groups = self.kv_cache_groups()
            group_meta = [metadata.for_group(g) for g in range(groups.num_groups)]

        def run(w, x, cache, i):  # i: a Python int (unroll) or traced (scan: every layer alike)
            window, local = layer_attention(c, i)
            if groups is None:
                return decoder_layer(w, x, *ropes[local], cache, i, metadata, c, lay, proj, attn_kw, window)
            g, j = groups.layer_slot(i)
            return decoder_layer(w, x, *ropes[local], cache, i, group_meta[g], c, lay, proj, attn_kw, window,
                                 cache_slot=j)

        if self.layer_loop == "scan":
            in_place = {n: IN_PLACE for n in proj.in_place}  # read by the Projector at the traced layer

            def body(carry, w):
                x, cache, i = carry
                w = {**w, **in_place} if lora is None else with_lora({**w[0], **in_place}, w[1])
                x, cache = run(w, x, cache, i)
                return (x, cache, i + 1), None

            # the scan slices only the weights the Projector does not read in place (the chunked
            # quantized ones reach the loop once, through the Projector)
            sliced = {n: v for n, v in stacked.items() if n not in in_place}
            xs = sliced if lora is None else (sliced, lora.weights)  # LoRA pairs stacked [L, S, ...] too
            (x, kv_cache, _), _ = jax.lax.scan(body, (x, kv_cache, jnp.int32(0)), xs)
        else:
            for i, layer in enumerate(self.layers):  # unrolled at trace time: each weight read in place
                w = layer.arrays() if lora is None else with_lora(layer.arrays(), lora.weights[i])
                x, kv_cache = run(w, x, kv_cache, i)
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps, c.norm_offset), kv_cache

    def kv_cache_groups(self, hybrid: bool = True) -> KVCacheGroups:
        """The model's KV cache groups (jaxllm/core/kv_cache_groups.py) from its layers' windows; one group
        for a model whose layers attend alike (a sliding one when they all slide: Mistral v0.1), one full
        group with `hybrid=False`."""
        c = self.config
        windows = [layer_attention(c, i)[0] for i in range(c.num_layers)]
        return make_groups(windows, hybrid=hybrid)

    def classify(self, hidden: jax.Array) -> jax.Array:
        """hidden [S, E] (each sequence's last token, after the final norm) → the classifier head's
        logits [S, num_labels] f32 (HF's bias-free `score` linear, here in f32)."""
        if self.score is None:
            raise ValueError(f"task='classify' is invalid for this model: the {self.config.architecture} "
                             f"checkpoint has no score head (not a *ForSequenceClassification)")
        return jnp.dot(hidden.astype(jnp.float32), self.score[...].astype(jnp.float32))  # [S, L] f32

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, E] → logits [N, vocab] f32."""
        if not self.config.has_lm_head:
            raise ValueError(f"task='generate' is invalid for this model: the {self.config.architecture} "
                             f"checkpoint has no LM head (an embedding model); use task='embed'")
        if self.lm_head is None:
            logits = lm_logits(hidden, self.embed[...], self.layout, tied=True)
        else:
            logits = lm_logits(hidden, self.lm_head[...], self.layout, tied=False)
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / self.config.logits_scaling
        cap = self.config.final_logit_softcap
        if cap is not None:  # Gemma 2
            logits = jnp.tanh(logits / cap) * cap
        return logits


def build_model(config: ModelConfig, params: dict[str, np.ndarray | jax.Array], dtype,
                attention_impl: str | None = None, layout=None, layer_loop: str | None = None,
                quantization: str | None = None) -> LlamaForCausalLM:
    """Places a checkpoint's params (`param_shapes(config)`) in `dtype` (norms included, as HF does)
    on the default device, or with a jaxllm.parallel.TPLayout into their shards (numpy straight from
    host memory), fusing wq/wk/wv, bq/bk/bv and w_gate/w_up into the held layout (`MODEL_AXES`,
    fusion.py). With the "unroll" layer loop each stacked "layers.*" parameter is split into one
    array per layer as it is placed. `params` is emptied as it goes, so at most one stacked parameter
    group exists beside the placed ones. `config` is the checkpoint's config. `quantization`
    ("int8", "fp8", None): the per-layer projections (`QUANT_PARAMS`) become QuantWeights as each
    is placed (jaxllm/models/quant.py), so one full-precision projection exists at a time; where the
    chunked dot runs (CPU, one device) an fp8 q is held as its uint8 bits (quant_dot.holds_fp8_bits). A
    checkpoint param that is already a QuantWeight (a GGUF's Q8_0 projection: int8 with block
    scales; an fp8 checkpoint's: float8 with per-channel or block scales) is placed as it is (fused
    like the others); see `prequantized.check`."""
    check_method(quantization)
    if config.is_moe and prequantized.method(params) not in (None, "fp8", "int4"):
        raise ValueError(f"quantization={prequantized.method(params)!r} is not supported for the "
                         f"{config.architecture} MoE model: its experts quantize to 'int8', 'fp8' or 'int4' only")
    prequantized.requantize_int4(params, quantization)
    check_backend(quantization or prequantized.method(params))
    prequantized.check(params, quantization)
    layer_loop = layer_loop_mode(layer_loop, config)
    split = layer_loop == "unroll"
    if layout is not None:
        arrays = layout.place_params(config, params, dtype, split_layers=split, quantization=quantization)
        return LlamaForCausalLM(layout.model_config(config), arrays, attention_impl=attention_impl, layout=layout,
                                layer_loop=layer_loop)
    arrays = {}
    fp8_bits = quantization == "fp8" and quant_dot.holds_fp8_bits(None)
    int4_packed = quantization == "int4" and quant_dot.packs_int4(None)
    held_bits = quant_dot.holds_fp8_bits(None)  # an fp8 checkpoint's own q too
    pack4 = quant_dot.packs_int4(None)  # a 4-bit q as uint8 two a byte (quant_pack4.py)
    pack4_proj = quant_dot.packs_int4_projections(None)  # ... and where the Pallas quant_matmul reads them
    for held, sources, fn in placement_plan(params, kv_repeat=1, tp=1):
        xs = [params.pop(s) for s in sources]  # numpy slices stay on the host until placed

        def make(i, fn=fn, xs=xs, held=held):
            if isinstance(xs[0], QuantWeight):  # already quantized: q and scales fused alike
                return prequantized.place([x if i is None else x[i] for x in xs], fn, held_bits,
                                          pack4_proj if held in QUANT_PARAMS else pack4)
            parts = [jnp.asarray(x if i is None else x[i], dtype=dtype) for x in xs]
            w = parts[0] if fn is None else fn(jnp, *parts)  # tp=1: fusing is concatenation
            if quantization and held in QUANT_PARAMS:
                w = _quantize_jit(w, quantization, QUANT_PARAMS[held], i is None, fp8_bits,
                                  quantization == "int4" and pack4_proj)
            elif quantization and held in EXPERT_QUANT_PARAMS:  # [(L,) X, in, out]: per expert and column
                w = _quantize_experts_jit(w, quantization, fp8_bits, int4_packed)
            return w

        if split and held.startswith("layers."):
            arrays[held] = [make(i) for i in range(config.num_layers)]
        else:
            arrays[held] = make(None)
        del xs
    return LlamaForCausalLM(config, arrays, attention_impl=attention_impl, layer_loop=layer_loop)


_quantize_jit = jax.jit(quantize, static_argnums=(1, 2, 3, 4, 5))
_quantize_experts_jit = jax.jit(quantize_experts, static_argnums=(1, 2, 3))
