"""One HF tensor name → where it lands among the checkpoint params (`param_shapes`, the loaders'
contract), tensor by tensor: what `LLM.load_weights` (jaxllm/runner/weight_update.py) needs to write a
trainer's state-dict entries into a running engine. No jax.

The mapping is `assemble_params`' (checkpoints/assemble.py), per tensor instead of per stacked param:
HF linears [out, in] are transposed to [in, out] and split into head axes (q/k/v/o), norms and
biases kept, `lm_head.weight` [V, E] transposed; Phi-3's fused `qkv_proj` / `gate_up_proj` split into
Llama's q/k/v and gate/up row blocks (checkpoints/hf_names.py); a multimodal checkpoint's text-model
prefixes and a base model's names without `model.` resolved as the loader resolves them. A test
(tests/checkpoints/test_hf_tensor_map.py) checks every entry against `assemble_params` itself.

Not mapped (refused by name by the caller): MoE experts and routers, a classifier head built from
LM-head rows (`classifier_from_token`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxllm.models.config import ModelConfig

# stored prefix → Llama's (checkpoints/hf_names.py's _TEXT_PREFIXES: Gemma 3 multimodal exports)
_ALIASES = (("model.language_model.", "model."), ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."))
# tensors a loader reads past without loading (a multimodal checkpoint's vision side)
SKIPPED_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class Target:
    """One destination of an HF tensor: checkpoint param `param` (a `param_shapes` name), at `layer`
    of its stacked axis (None: not per layer); `convert` turns the HF tensor (HF orientation, shape
    checked by the caller) into that layer's slice."""
    param: str
    layer: int | None
    convert: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_shape: tuple[int, ...]
    targets: tuple[Target, ...]


def canonical_name(name: str) -> str:
    """The Llama-style name a loader would read `name` as (text-model prefixes resolved; a base
    model's `layers.N...` / `embed_tokens` / `norm` names given their `model.` prefix)."""
    for stored, ours in _ALIASES:
        if name.startswith(stored):
            return ours + name[len(stored):]
    if name.startswith(("layers.", "embed_tokens.", "norm.")):
        return "model." + name
    return name


def _linear(*shape: int):
    return lambda t: np.ascontiguousarray(t.T).reshape(shape)  # HF [out, in] → [in, ...out]


def _rows(start: int, stop: int, *shape: int):
    return lambda t: np.ascontiguousarray(t[start:stop].T).reshape(shape)


def _same(t: np.ndarray) -> np.ndarray:
    return t


def hf_tensor_map(c: ModelConfig) -> dict[str, Entry]:
    """{HF tensor name: Entry} for every tensor the HF loader reads for `c` (dense models)."""
    H, K, D, E, F, V = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size, c.vocab_size
    out: dict[str, Entry] = {"model.embed_tokens.weight": Entry((V, E), (Target("embed", None, _same),)),
                             "model.norm.weight": Entry((E,), (Target("final_norm", None, _same),))}
    if not c.tie_word_embeddings and c.has_lm_head:
        out["lm_head.weight"] = Entry((V, E), (Target("lm_head", None, _linear(E, V)),))
    if c.num_labels and not c.classifier_from_token:
        out["score.weight"] = Entry((c.num_labels, E), (Target("score", None, _linear(E, c.num_labels)),))
    post = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    for i in range(c.num_layers):
        p = f"model.layers.{i}."

        def one(suffix: str, shape, param: str, convert=_same):
            out[p + suffix] = Entry(tuple(shape), (Target(param, i, convert),))

        one("input_layernorm.weight", (E,), "layers.input_norm")
        one(f"{post}.weight", (E,), "layers.post_norm")
        if c.sandwich_norms:
            one("post_attention_layernorm.weight", (E,), "layers.attn_out_norm")
            one("post_feedforward_layernorm.weight", (E,), "layers.mlp_out_norm")
        one("self_attn.o_proj.weight", (E, H * D), "layers.wo", _linear(H, D, E))
        if c.architecture == "phi3":  # fused in the checkpoint: one tensor, several targets (hf_names.py)
            out[p + "self_attn.qkv_proj.weight"] = Entry(((H + 2 * K) * D, E), (
                Target("layers.wq", i, _rows(0, H * D, E, H, D)),
                Target("layers.wk", i, _rows(H * D, (H + K) * D, E, K, D)),
                Target("layers.wv", i, _rows((H + K) * D, (H + 2 * K) * D, E, K, D))))
            out[p + "mlp.gate_up_proj.weight"] = Entry((2 * F, E), (
                Target("layers.w_gate", i, _rows(0, F, E, F)), Target("layers.w_up", i, _rows(F, 2 * F, E, F))))
        else:
            one("self_attn.q_proj.weight", (H * D, E), "layers.wq", _linear(E, H, D))
            one("self_attn.k_proj.weight", (K * D, E), "layers.wk", _linear(E, K, D))
            one("self_attn.v_proj.weight", (K * D, E), "layers.wv", _linear(E, K, D))
            if not c.is_moe:
                one("mlp.gate_proj.weight", (F, E), "layers.w_gate", _linear(E, F))
                one("mlp.up_proj.weight", (F, E), "layers.w_up", _linear(E, F))
        if not c.is_moe:
            one("mlp.down_proj.weight", (E, F), "layers.w_down", _linear(F, E))
        if c.attention_bias:
            one("self_attn.q_proj.bias", (H * D,), "layers.bq", lambda t: t.reshape(H, D))
            one("self_attn.k_proj.bias", (K * D,), "layers.bk", lambda t: t.reshape(K, D))
            one("self_attn.v_proj.bias", (K * D,), "layers.bv", lambda t: t.reshape(K, D))
        if c.qk_norm:
            one("self_attn.q_norm.weight", (D,), "layers.q_norm")
            one("self_attn.k_norm.weight", (D,), "layers.k_norm")
    return out
