"""THE table mapping logical axis names to mesh axes (the only place that knows about "tp").

Model code names the axes of every parameter (`jaxllm.models.llama.PARAM_AXES` for checkpoints,
`MODEL_AXES` for what the model holds) and of the few activations it pins; this table turns those
names into `PartitionSpec`s. Megatron layout:

    wqkv [L, E, qkv_heads, D]      column-parallel, fused in shard-major order (models/fusion.py):
                                   device d holds its q heads, then its k heads, then its v heads
    w_gate_up [L, E, mlp2]         column-parallel, shard-major: device d holds its gate, then its up slice
    (checkpoint wq/wk/wv [L, E, heads|kv_heads, D], w_gate/w_up [L, E, mlp] load sharded the same way)
    wo [L, heads, D, E]            row-parallel (heads on "tp": XLA inserts one all-reduce)
    w_down [L, mlp, E]             row-parallel (mlp on "tp": one all-reduce)
    we_gate_up [L, X, E, mlp2]     MoE experts: each expert column-parallel like w_gate_up,
    we_down [L, X, mlp, E]         and row-parallel like w_down; the router [L, E, X] replicated
    embed [V, E], lm_head [E, V]   vocab-parallel ("vocab" on "tp"), see README "Vocabulary"
    KV cache [L, N, B, kv_heads, D]  kv_heads on "tp"

Everything else (norms, layers, head_dim, embed, tokens) is replicated. A "dp" mesh axis exists
(size 1 today) so data parallelism can later map "tokens"/"seqs" to it without touching models.
"""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

TP = "tp"
DP = "dp"
MESH_AXES = (DP, TP)

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": TP,
    "heads": TP,
    "kv_heads": TP,
    "mlp": TP,
    "qkv_heads": TP,  # fused q+k+v heads (shard-major); also the [tp] axis of a split fused output
    "mlp2": TP,  # fused gate+up columns (shard-major)
    "embed": None,
    "experts": None,  # MoE: every device holds its mlp slice of every expert (jaxllm/models/moe.py)
    "head_dim": None,
    "layers": None,
    "norm": None,
    "labels": None,  # a classifier head's outputs (few: replicated)
    # activations
    "tokens": None,
    "seqs": None,
    # LoRA slots (jaxllm/lora/slots.py): A/B otherwise take their base weight's input/output axes
    "lora_slots": None,
    "lora_rank": None,
    # KV cache
    "cache_blocks": None,
    "block_slots": None,
}

# The KV cache's logical axes ([num_layers, num_blocks, block_size, num_kv_heads, head_dim]).
CACHE_AXES = ("layers", "cache_blocks", "block_slots", "kv_heads", "head_dim")
# An fp8 cache's per-layer, per-kv-head scales ([num_layers, num_kv_heads]): sharded with their heads.
CACHE_SCALE_AXES = ("layers", "kv_heads")


def logical_to_spec(axes: tuple[str | None, ...], rules: dict[str, str | None] | None = None) -> P:
    """("layers", "embed", "heads", "head_dim") → P(None, None, "tp", None)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    out = []
    for a in axes:
        if a is not None and a not in rules:
            raise KeyError(f"logical axis {a!r} has no rule in jaxllm.parallel.rules.LOGICAL_AXIS_RULES")
        out.append(None if a is None else rules[a])
    return P(*out)
