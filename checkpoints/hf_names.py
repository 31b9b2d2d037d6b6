"""Architecture-specific HF tensor names → the names `assemble_params` reads (Llama's).

Phi-3 (`Phi3ForCausalLM`) stores each layer's q/k/v as one `self_attn.qkv_proj.weight`
[(H + 2K) * D, E] (rows: q, then k, then v) and gate/up as one `mlp.gate_up_proj.weight` [2F, E]
(rows: gate, then up; HF's `chunk(2)`). The getter here hands out their row blocks under Llama's
names (q_proj, k_proj, v_proj, gate_proj, up_proj), so the checkpoint contract stays the unfused
wq/wk/wv, w_gate/w_up and `build_model` / `TPLayout.place_params` re-fuse them in shard-major order
for any tensor_parallel_size (jaxllm/models/fusion.py).
"""
from __future__ import annotations

import logging

from checkpoints.assemble import GetTensor
from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig

log = logging.getLogger("jaxllm.checkpoints")

# A multimodal checkpoint's text model (Gemma3ForConditionalGeneration): stored prefix → Llama's prefix.
# transformers 5's save_pretrained writes model.language_model.* and lm_head; checkpoints saved before
# transformers 4.52 (most on the Hub) language_model.model.* and language_model.lm_head.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_SKIPPED_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                     "multi_modal_projector.")


def text_model_aliases(names, source: str) -> dict[str, str]:
    """{Llama name: stored name} for a multimodal checkpoint's text-model tensors (empty for a plain
    one); logs in one line the vision tower / projector tensors left unread."""
    aliases = {}
    for name in names:
        for stored, ours in _TEXT_PREFIXES:
            if name.startswith(stored):
                aliases[ours + name[len(stored):]] = name
    if aliases:
        skipped = sorted(n for n in names if n.startswith(_SKIPPED_PREFIXES))
        log.info("%s: multimodal checkpoint: loading its text model only (%d tensors); image inputs are not "
                 "supported, the %d vision tower / projector tensors are skipped", source, len(aliases), len(skipped))
    return aliases


_PHI3_SPLITS = {  # Llama name suffix → (fused name suffix, index of the row block)
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}


def llama_names(config: ModelConfig, get: GetTensor, source: str) -> GetTensor:
    """`get` (HF names as stored) → a getter by Llama's names for `config`'s architecture."""
    if config.architecture != "phi3":
        return get
    H, K, D, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    rows = {"self_attn.qkv_proj.weight": (H * D, K * D, K * D), "mlp.gate_up_proj.weight": (F, F)}
    last: dict[str, object] = {}  # the last fused tensor read: its three (two) parts come in a row

    def get_split(name: str):
        layer, _, suffix = name.rpartition("layers.")[2].partition(".")
        split = _PHI3_SPLITS.get(suffix) if name.startswith("model.layers.") else None
        if split is None:
            return get(name)
        fused_suffix, part = split
        fused_name = f"model.layers.{layer}.{fused_suffix}"
        if last.get("name") != fused_name:
            t = get(fused_name)
            if t is None:
                return get(name)  # not fused in this checkpoint: the plain name, or "missing"
            sizes = rows[fused_suffix]
            if t.ndim != 2 or t.shape[0] != sum(sizes):
                raise CheckpointError(f"{source}: tensor {fused_name} has shape {tuple(t.shape)}, the config "
                                      f"implies ({sum(sizes)}, {config.hidden_size})")
            last.clear()
            last.update(name=fused_name, tensor=t)
        t, sizes = last["tensor"], rows[fused_suffix]
        start = sum(sizes[:part])
        return t[start:start + sizes[part]]  # [rows of this part, E]

    return get_split
