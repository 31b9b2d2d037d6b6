"""ModelConfig: the one description of a Llama-family decoder, built from HF config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.models.arch_config import arch_fields, check_longrope, qwen_windows
from jaxllm.models.classifier_config import classifier_fields
from jaxllm.models.gemma_config import GEMMA_ARCHITECTURES, gemma3_text_config, gemma_fields, gemma_rope, hf_defaults

# HF model_type → the switches that distinguish it inside the one Llama-family decoder.
SUPPORTED_ARCHITECTURES = {
    "llama": dict(),
    "mistral": dict(),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm=True),
    "phi3": dict(),  # fused qkv/gate_up split by the loader; partial rotary, longrope (arch_config.py)
    "granite": dict(),  # multipliers and logits scaling (arch_config.py)
    # mixture-of-experts (jaxllm/models/moe.py): every layer's MLP is a routed set of experts
    "mixtral": dict(),
    "qwen3_moe": dict(qk_norm=True),
    "qwen2_moe": dict(attention_bias=True),  # + a shared expert per layer (shared_expert_intermediate_size)
    # Google Gemma 1 / 2 / 3 text (jaxllm/models/gemma_config.py): (1 + w) norms, scaled embeddings, GELU-tanh;
    # Gemma 2/3: sandwich norms, per-layer sliding window, soft-capping; Gemma 3: q/k norm, local rope
    "gemma": dict(),
    "gemma2": dict(),
    "gemma3_text": dict(),
}
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe")


class ModelConfigError(ValueError):
    """A model config that jaxllm cannot run, with the field and value named."""


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")  # jaxllm/models/rope.py


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a SUPPORTED_ARCHITECTURES key
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict (hashable)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm of q and k per head before RoPE (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # False for a base model without an LM head (HF architectures LlamaModel / MistralModel /
    # Qwen2Model / Qwen3Model and untied embeddings, e.g. e5-mistral): it can only embed
    has_lm_head: bool = True
    # *ForSequenceClassification (jaxllm/models/classifier_config.py): a bias-free `score` linear
    # [hidden_size, num_labels] on the last token's hidden state; 0 = no such head
    num_labels: int = 0
    labels: tuple[str, ...] = ()  # id2label in id order
    classify_activation: str = ""  # "softmax" | "sigmoid" | "identity" (vLLM's classify rule)
    score_activation: str = ""  # the cross-encoder score's (vLLM's rule)
    # score's pair encoding (vLLM's use_sep_token): the tokenizer's pair template, or text_1 + text_2 as one text
    use_sep_token: bool = True
    # an unconverted reranker (a *ForCausalLM with classifier_from_token, classifier_config.py): the tokens
    # whose LM-head rows make `score`, the method, and the tokens' ids (resolved by the HF loader through
    # the checkpoint's tokenizer: checkpoints/seq_cls_from_lm.py)
    classifier_from_token: tuple[str, ...] = ()
    classifier_method: str = ""  # "from_2_way_softmax" | "no_post_processing"
    classifier_token_ids: tuple[int, ...] = ()
    partial_rotary_factor: float = 1.0  # Phi-4-mini 0.75: RoPE on the first rotary_dim dims of head_dim
    # Granite (jaxllm/models/arch_config.py); 1.0 / None leave a plain Llama
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # the softmax scale; None = head_dim ** -0.5
    logits_scaling: float = 1.0  # logits are divided by it
    # Gemma (jaxllm/models/gemma_config.py); the defaults leave a plain Llama
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" or "gelu_tanh"
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), in f32
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (layers.attn_out_norm / mlp_out_norm)
    attn_logit_softcap: float | None = None  # attention scores = cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" | "full_attention"; None: all alike
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' default-rope base

    # mixture of experts (mixtral, qwen3_moe; 0 = a dense MLP): every layer routes each token to
    # num_experts_per_tok of num_experts experts, each an MLP of moe_intermediate_size
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral always)
    # Qwen2-MoE: a dense SwiGLU MLP of this size on every token, times sigmoid(x . shared_gate), added to
    # the routed experts' output (0 = none); held as w_gate/w_up/w_down and shared_gate (llama.py)
    shared_expert_intermediate_size: int = 0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.num_experts:
            if self.moe_intermediate_size <= 0:
                raise ModelConfigError(f"moe_intermediate_size={self.moe_intermediate_size} must be > 0")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ModelConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                       f"1..num_experts={self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mlp_size(self) -> int:
        """The intermediate size each MLP of a layer has: an expert's (MoE) or the dense MLP's."""
        return self.moe_intermediate_size if self.is_moe else self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        """The leading dims of head_dim that RoPE rotates (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """The softmax scale of q.k: Granite's attention_multiplier, else 1/sqrt(head_dim)."""
        return self.head_dim ** -0.5 if self.attention_multiplier is None else self.attention_multiplier

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def max_model_len_limit(self) -> int:
        """The longest max_model_len the model takes, as vLLM derives it: max_position_embeddings, but for
        yarn original_max_position_embeddings * factor and for dynamic max_position_embeddings * factor
        (the scaled length those types are configured for)."""
        s = self.rope_scaling_dict or {}
        if s.get("rope_type") == "yarn" and s.get("factor") is not None:
            return int(s["original_max_position_embeddings"] * s["factor"])
        if s.get("rope_type") == "dynamic":
            return int(self.max_position_embeddings * s["factor"])
        return self.max_position_embeddings

    @property
    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * e * f
        if self.is_moe:  # every expert's MLP plus the router (and a shared expert with its gate)
            mlp = self.num_experts * 3 * e * self.moe_intermediate_size + e * self.num_experts
            mlp += 3 * e * self.shared_expert_intermediate_size + (e if self.shared_expert_intermediate_size else 0)
        per_layer = attn + mlp + 2 * e
        head = 0 if self.tie_word_embeddings or not self.has_lm_head else self.vocab_size * e
        return self.num_layers * per_layer + self.vocab_size * e + head + e + e * self.num_labels

    @property
    def num_active_params(self) -> int:
        """Parameters one token reads: num_params with only num_experts_per_tok experts per layer."""
        if not self.is_moe:
            return self.num_params
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params - self.num_layers * idle * 3 * self.hidden_size * self.moe_intermediate_size

    @staticmethod
    def from_hf(cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type == "gemma3":  # Gemma3ForConditionalGeneration: its text model only (gemma_config.py)
            cfg, model_type = gemma3_text_config(cfg, source), "gemma3_text"
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        cfg = hf_defaults(model_type, cfg)  # Gemma: HF's defaults for absent fields
        act = cfg.get("hidden_act", "silu")
        if act != "silu" and model_type not in GEMMA_ARCHITECTURES:  # Gemma's activation: gemma_fields
            raise ModelConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=True is not supported")
        flags = dict(SUPPORTED_ARCHITECTURES[model_type])
        if model_type in ("llama", "mistral", "granite") and cfg.get("attention_bias"):
            flags["attention_bias"] = True
        if model_type == "qwen2_moe":  # HF Qwen2MoeConfig.qkv_bias, default True
            flags["attention_bias"] = bool(cfg.get("qkv_bias", True))
        # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
        rope, local_theta = gemma_rope(model_type, cfg, dict(cfg.get("rope_parameters") or {}), source)
        scaling = cfg.get("rope_scaling") or {}
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.update({k: v for k, v in scaling.items() if k not in rope})
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        flags.update(arch_fields(model_type, cfg, rope, source))
        flags.update(gemma_fields(model_type, cfg, source))
        if local_theta is not None:
            flags["rope_local_theta"] = local_theta
        rotary_dim = int(head_dim * flags.get("partial_rotary_factor", 1.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"{source}: rope_type={rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        rope_scaling = None
        if rope_type != "default":
            rope["rope_type"] = rope_type
            rope.pop("type", None)
            _check_rope(rope, cfg, source)
            if rope_type == "longrope":
                check_longrope(rope, cfg, rotary_dim, source)
            rope_scaling = tuple(sorted(rope.items()))
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and not cfg.get("use_sliding_window", False):
            sliding = None
        sliding, qwen_types = qwen_windows(model_type, cfg, sliding, source)  # per layer: max_window_layers
        if qwen_types is not None:
            flags["layer_types"] = qwen_types
        archs = cfg.get("architectures") or []
        tied = bool(cfg.get("tie_word_embeddings", False))
        base_model = bool(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                             for a in archs)
        moe = _moe_fields(model_type, cfg, source)
        cls = classifier_fields(cfg, source)  # a classifier has no LM head, tied embeddings or not
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=tied,
            has_lm_head=(not base_model or tied) and not cls,
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **moe,
            **cls,
            **flags,
        )


def _moe_fields(model_type: str, cfg: dict, source: str) -> dict:
    """The MoE fields of a mixtral / qwen3_moe config (router jitter is a training knob, ignored);
    the variants jaxllm does not run are refused in one line naming the field."""
    if model_type not in MOE_ARCHITECTURES:
        return {}
    # HF's defaults for a missing field; transformers 5 writes either model's expert count as num_local_experts
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if model_type == "mixtral":
        experts = 8 if experts is None else experts
        inter, norm, top_k = cfg["intermediate_size"], True, cfg.get("num_experts_per_tok", 2)
    else:  # qwen3_moe / qwen2_moe (HF's defaults differ)
        q2 = model_type == "qwen2_moe"
        experts = (60 if q2 else 128) if experts is None else experts
        inter = cfg.get("moe_intermediate_size", 1408 if q2 else 768)
        top_k = cfg.get("num_experts_per_tok", 4 if q2 else 8)
        norm = bool(cfg.get("norm_topk_prob", False))
        step = cfg.get("decoder_sparse_step", 1)
        if step != 1:
            raise ModelConfigError(f"{source}: decoder_sparse_step={step!r} is not supported (only 1: every layer MoE)")
        if cfg.get("mlp_only_layers"):
            raise ModelConfigError(f"{source}: mlp_only_layers={cfg['mlp_only_layers']!r} is not supported "
                                   f"(only []: no dense-MLP layers)")
    shared = {}
    if model_type == "qwen2_moe":
        s = cfg.get("shared_expert_intermediate_size", 5632)
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ModelConfigError(f"{source}: shared_expert_intermediate_size={s!r} must be an integer >= 0")
        shared = dict(shared_expert_intermediate_size=s)
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if cfg.get(key) and not (model_type == "qwen2_moe" and key == "shared_expert_intermediate_size"):
            raise ModelConfigError(f"{source}: {key}={cfg[key]!r} is not supported for model_type="
                                   f"{model_type!r} (shared experts: qwen2_moe only)")
    for key, v in (("num_experts" if model_type == "qwen3_moe" else "num_local_experts", experts),
                   ("moe_intermediate_size", inter), ("num_experts_per_tok", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelConfigError(f"{source}: {key}={v!r} must be an integer >= 1")
    if top_k > experts:
        raise ModelConfigError(f"{source}: num_experts_per_tok={top_k} exceeds the {experts} experts")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter, norm_topk_prob=norm,
                **shared)


def _check_rope(rope: dict, cfg: dict, source: str) -> None:
    """Fills what HF defaults and refuses, in one line, what the scaling type cannot run without."""
    kind = rope["rope_type"]
    if kind == "yarn":  # HF: a top-level original_max_position_embeddings wins, else max_position_embeddings
        old_len = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = old_len or cfg.get("max_position_embeddings", 4096)
    if kind == "dynamic":
        if "alpha" in rope:
            raise ModelConfigError(f"{source}: rope_scaling.alpha={rope['alpha']!r} (dynamic NTK-alpha scaling) is "
                                   f"not supported (dynamic takes rope_scaling.factor)")
        if rope.get("factor") is None:
            raise ModelConfigError(f"{source}: rope_scaling.factor is missing (rope_type 'dynamic' needs it)")
    for key in ("factor", "attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        v = rope.get(key) if kind in ("yarn", "dynamic") else None
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ModelConfigError(f"{source}: rope_scaling.{key}={v!r} must be a number >= 0")
