"""THE table mapping logical axis names to mesh axes (the only place that knows about "tp").

Model code names the axes of every parameter (`jaxllm.models.llama_params.PARAM_AXES` for checkpoints,
`MODEL_AXES` for what the model holds) and of the few activations it pins; this table turns those
names into `PartitionSpec`s. Megatron layout:

    wqkv [L, E, qkv_heads, D]      column-parallel, fused in shard-major order (models/fusion.py):
                                   device d holds its q heads, then its k heads, then its v heads
    w_gate_up [L, E, mlp2]         column-parallel, shard-major: device d holds its gate, then its up slice
    (checkpoint wq/wk/wv [L, E, heads|kv_heads, D], w_gate/w_up [L, E, mlp] load sharded the same way)
    wo [L, heads, D, E]            row-parallel (heads on "tp": XLA inserts one all-reduce)
    w_down [L, mlp, E]             row-parallel (mlp on "tp": one all-reduce)
    we_gate_up [L, X, E, expert_mlp2]  MoE experts: each expert column-parallel like w_gate_up,
    we_down [L, X, expert_mlp, E]      and row-parallel like w_down; the router [L, E, X] replicated
                                   (with --enable-expert-parallel, `expert_parallel_rules`: X on "tp"
                                   instead, every expert whole on one device)
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
    # MoE (jaxllm/models/moe.py): by default every device holds its F/tp slice of every expert (TP of
    # experts); `expert_parallel_rules` swaps these three for expert parallelism
    "experts": None,
    "expert_mlp": TP,  # each expert's intermediate axis (F)
    "expert_mlp2": TP,  # each expert's fused gate+up columns (2F, shard-major like "mlp2")
    "router_experts": None,  # the router's output axis (its logits over the experts): always replicated
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


def expert_parallel_rules(rules: dict[str, str | None]) -> dict[str, str | None]:
    """`rules` with MoE experts sharded whole (vLLM's --enable-expert-parallel): the expert axis on
    "tp" (device d holds experts [d*X/tp, (d+1)*X/tp)), each expert's F axis unsplit; attention, the
    dense / shared-expert MLP and the router keep their TP rules."""
    return dict(rules, experts=TP, expert_mlp=None, expert_mlp2=None)


def logical_to_spec(axes: tuple[str | None, ...], rules: dict[str, str | None] | None = None) -> P:
    """("layers", "embed", "heads", "head_dim") → P(None, None, "tp", None)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    out = []
    for a in axes:
        if a is not None and a not in rules:
            raise KeyError(f"logical axis {a!r} has no rule in jaxllm.parallel.rules.LOGICAL_AXIS_RULES")
        out.append(None if a is None else rules[a])
    return P(*out)
