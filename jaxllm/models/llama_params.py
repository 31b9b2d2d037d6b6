"""The Llama-family parameter layout, shared by the model, the checkpoint loaders and jaxllm/parallel.

Two name sets: a checkpoint's (`PARAM_AXES`, `param_shapes`: the loaders' contract; per-layer
weights stacked on a leading "layers" axis, projections input-major with explicit head axes) and
what the model holds (`MODEL_AXES`, `model_param_shapes`: wq/wk/wv, bq/bk/bv and w_gate/w_up fused
as jaxllm/models/fusion.py places them). Each parameter names its logical axes; jaxllm/parallel
maps them to mesh axes. `LAYER_PARAMS`: the held per-layer names without their "layers." prefix.
"""
from __future__ import annotations

from jaxllm.models.config import ModelConfig
from jaxllm.models.fusion import FUSED, FUSED_PARTS

# Logical axis names of every parameter; jaxllm/parallel maps them to mesh axes.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "score": ("embed", "labels"),  # a sequence classifier's head (classifier_config.py), replicated
    "final_norm": ("norm",),
    "layers.input_norm": ("layers", "norm"),
    "layers.post_norm": ("layers", "norm"),
    "layers.attn_out_norm": ("layers", "norm"),  # Gemma 2/3 sandwich norms (HF post_attention_layernorm,
    "layers.mlp_out_norm": ("layers", "norm"),  # post_feedforward_layernorm); post_norm: pre_feedforward
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
    # mixture of experts (jaxllm/models/moe.py): the router and each expert's MLP, in place of w_gate/w_up/w_down
    "layers.router": ("layers", "embed", "router_experts"),
    "layers.we_gate": ("layers", "experts", "embed", "expert_mlp"),
    "layers.we_up": ("layers", "experts", "embed", "expert_mlp"),
    "layers.we_down": ("layers", "experts", "expert_mlp", "embed"),
    # Qwen2-MoE's shared expert: w_gate/w_up/w_down of shared_expert_intermediate_size, and its gate
    "layers.shared_gate": ("layers", "embed"),
}
# What the model holds: PARAM_AXES with wq/wk/wv fused into wqkv, bq/bk/bv into bqkv and w_gate/w_up
# into w_gate_up (jaxllm/models/fusion.py). "qkv_heads" = H + 2K heads, "mlp2" = 2F, both
# column-parallel in shard-major order.
MODEL_AXES: dict[str, tuple[str, ...]] = {
    **{k: v for k, v in PARAM_AXES.items() if k not in FUSED_PARTS},
    "layers.wqkv": ("layers", "embed", "qkv_heads", "head_dim"),
    "layers.bqkv": ("layers", "qkv_heads", "head_dim"),
    "layers.w_gate_up": ("layers", "embed", "mlp2"),
    "layers.we_gate_up": ("layers", "experts", "embed", "expert_mlp2"),
}
LAYER_PARAMS = tuple(k.split(".", 1)[1] for k in MODEL_AXES if k.startswith("layers."))


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
    if c.is_moe:
        X, F, S = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        for n in ("layers.w_gate", "layers.w_up", "layers.w_down"):
            del shapes[n]
        if S:  # the shared expert: a dense MLP held under the dense names, and its gate
            shapes.update({"layers.w_gate": (L, E, S), "layers.w_up": (L, E, S), "layers.w_down": (L, S, E),
                           "layers.shared_gate": (L, E)})
        shapes.update({"layers.router": (L, E, X), "layers.we_gate": (L, X, E, F), "layers.we_up": (L, X, E, F),
                       "layers.we_down": (L, X, F, E)})
    if not c.tie_word_embeddings and c.has_lm_head:
        shapes["lm_head"] = (E, V)
    if c.num_labels:
        shapes["score"] = (E, c.num_labels)
    if c.attention_bias:
        shapes.update({"layers.bq": (L, H, D), "layers.bk": (L, K, D), "layers.bv": (L, K, D)})
    if c.qk_norm:
        shapes.update({"layers.q_norm": (L, D), "layers.k_norm": (L, D)})
    if c.sandwich_norms:
        shapes.update({"layers.attn_out_norm": (L, E), "layers.mlp_out_norm": (L, E)})
    return shapes


def model_param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameters the model holds (`MODEL_AXES`: fused), with their stacked shapes. `c` is the
    model's config (under tensor parallelism: layout.model_config, kv heads repeated)."""
    shapes = param_shapes(c)
    for held, (parts, axis) in FUSED.items():
        if all(p in shapes for p in parts):
            first = shapes[parts[0]]
            a = len(first) + axis
            shapes[held] = first[:a] + (sum(shapes[p][a] for p in parts),) + first[a + 1:]
            for p in parts:
                del shapes[p]
    return {k: shapes[k] for k in MODEL_AXES if k in shapes}
