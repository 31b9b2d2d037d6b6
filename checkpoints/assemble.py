"""HF-named tensors → jaxllm's stacked parameter layout (shared by the HF and GGUF loaders)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig
from jaxllm.models.llama_params import param_shapes

GetTensor = Callable[[str], "np.ndarray | None"]  # HF tensor name → array in HF orientation, None if absent


def assemble_params(config: ModelConfig, get: GetTensor, source: str, dtype=np.float32,
                    skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Builds {param name: array} with per-layer weights stacked on axis 0, checked against the config.
    `skip`: stacked param names the caller assembles itself (GGUF projections kept quantized)."""
    c = config
    H, K, D, E = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size

    def need(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = get(name)
        if t is None:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the config implies {shape}")
        return np.asarray(t, dtype=dtype)

    def linear(name: str, out_dim: int, in_dim: int) -> np.ndarray:
        return need(name, (out_dim, in_dim)).T  # HF stores [out, in]; we keep [in, out]

    def stack(fn) -> np.ndarray:
        return np.stack([fn(f"model.layers.{i}.") for i in range(c.num_layers)])

    F = c.intermediate_size
    lazy = {
        "embed": lambda: need("model.embed_tokens.weight", (c.vocab_size, E)),
        "final_norm": lambda: need("model.norm.weight", (E,)),
        "layers.input_norm": lambda: stack(lambda l: need(l + "input_layernorm.weight", (E,))),
        "layers.post_norm": lambda: stack(lambda l: need(l + "post_attention_layernorm.weight", (E,))),
        "layers.wq": lambda: stack(lambda l: linear(l + "self_attn.q_proj.weight", H * D, E).reshape(E, H, D)),
        "layers.wk": lambda: stack(lambda l: linear(l + "self_attn.k_proj.weight", K * D, E).reshape(E, K, D)),
        "layers.wv": lambda: stack(lambda l: linear(l + "self_attn.v_proj.weight", K * D, E).reshape(E, K, D)),
        "layers.wo": lambda: stack(lambda l: linear(l + "self_attn.o_proj.weight", E, H * D).reshape(H, D, E)),
        "layers.w_gate": lambda: stack(lambda l: linear(l + "mlp.gate_proj.weight", F, E)),
        "layers.w_up": lambda: stack(lambda l: linear(l + "mlp.up_proj.weight", F, E)),
        "layers.w_down": lambda: stack(lambda l: linear(l + "mlp.down_proj.weight", E, F)),
    }
    if c.sandwich_norms:  # Gemma 2/3: HF's post_attention_layernorm normalises the attention output, and
        # pre_feedforward_layernorm is the MLP's input norm (Llama's post_attention_layernorm role: post_norm)
        norm = lambda suffix: lambda: stack(lambda l: need(l + suffix, (E,)))  # noqa: E731
        lazy.update({"layers.post_norm": norm("pre_feedforward_layernorm.weight"),
                     "layers.attn_out_norm": norm("post_attention_layernorm.weight"),
                     "layers.mlp_out_norm": norm("post_feedforward_layernorm.weight")})
    if c.is_moe:
        for n in ("layers.w_gate", "layers.w_up", "layers.w_down"):
            del lazy[n]
        lazy.update(moe_params(c, get, need, stack))
    p: dict[str, np.ndarray] = {k: f() for k, f in lazy.items() if k not in skip}
    if c.attention_bias:
        p["layers.bq"] = stack(lambda l: need(l + "self_attn.q_proj.bias", (H * D,)).reshape(H, D))
        p["layers.bk"] = stack(lambda l: need(l + "self_attn.k_proj.bias", (K * D,)).reshape(K, D))
        p["layers.bv"] = stack(lambda l: need(l + "self_attn.v_proj.bias", (K * D,)).reshape(K, D))
    if c.qk_norm:
        p["layers.q_norm"] = stack(lambda l: need(l + "self_attn.q_norm.weight", (D,)))
        p["layers.k_norm"] = stack(lambda l: need(l + "self_attn.k_norm.weight", (D,)))
    if not c.tie_word_embeddings and c.has_lm_head:
        p["lm_head"] = linear("lm_head.weight", c.vocab_size, E)
    if c.num_labels and "score" not in skip and c.classifier_from_token:  # a *ForCausalLM as a reranker:
        from checkpoints.seq_cls_from_lm import score_from_lm_rows  # score from the tokens' LM-head rows

        ids = list(c.classifier_token_ids)
        lm = p["embed"] if c.tie_word_embeddings and "embed" in p else need(
            "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight", (c.vocab_size, E))
        p["score"] = score_from_lm_rows(c, lm[ids] if ids else lm[:0], source).astype(dtype)
    elif c.num_labels and "score" not in skip:  # *ForSequenceClassification: score.weight [num_labels, E]
        p["score"] = linear("score.weight", c.num_labels, E)
    expected = {k: v for k, v in param_shapes(c).items() if k not in skip}
    assert {k: v.shape for k, v in p.items()} == expected, "internal: assembled shapes differ from param_shapes"
    return p


# per model_type: (the MoE block's module, (gate, up, down) of expert N's HF names)
_MOE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
              "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def moe_params(c: ModelConfig, get: GetTensor, need, stack) -> dict:
    """Lazy loaders of the router and the experts, stacked [L, X, in, out]. Each expert's weights are
    read from `experts.N.w1/w3/w2` (Mixtral) or `experts.N.gate_proj/up_proj/down_proj` (Qwen3-MoE)
    as HF checkpoints store them, or from the fused `experts.gate_up_proj` [X, 2F, E] /
    `experts.down_proj` [X, E, F] that transformers 5 keeps in memory."""
    E, X, F = c.hidden_size, c.num_experts, c.moe_intermediate_size
    block, (g, u, d) = _MOE_NAMES[c.architecture]

    def experts(l: str, part: int) -> np.ndarray:  # part 0 gate, 1 up, 2 down → [X, in, out]
        fused = l + f"{block}.experts.gate_up_proj" if part < 2 else l + f"{block}.experts.down_proj"
        if get(fused) is not None:
            if part < 2:
                w = need(fused, (X, 2 * F, E))[:, part * F:(part + 1) * F]  # [X, F, E]
            else:
                w = need(fused, (X, E, F))
            return np.ascontiguousarray(w.transpose(0, 2, 1))
        name, shape = ((g, (F, E)), (u, (F, E)), (d, (E, F)))[part]
        return np.stack([need(f"{l}{block}.experts.{x}.{name}.weight", shape).T for x in range(X)])

    shared = {}
    S = c.shared_expert_intermediate_size
    if S:  # Qwen2-MoE: mlp.shared_expert.{gate,up,down}_proj [S, E] / [E, S] and mlp.shared_expert_gate [1, E]
        se = f"{block}.shared_expert."
        shared = {
            "layers.w_gate": lambda: stack(lambda l: need(l + se + "gate_proj.weight", (S, E)).T),
            "layers.w_up": lambda: stack(lambda l: need(l + se + "up_proj.weight", (S, E)).T),
            "layers.w_down": lambda: stack(lambda l: need(l + se + "down_proj.weight", (E, S)).T),
            "layers.shared_gate": lambda: stack(lambda l: need(l + f"{block}.shared_expert_gate.weight", (1, E))[0]),
        }
    return {
        **shared,
        "layers.router": lambda: stack(lambda l: need(l + f"{block}.gate.weight", (X, E)).T),
        "layers.we_gate": lambda: stack(lambda l: experts(l, 0)),
        "layers.we_up": lambda: stack(lambda l: experts(l, 1)),
        "layers.we_down": lambda: stack(lambda l: experts(l, 2)),
    }
