"""PEFT LoRA adapters from disk: `load_adapter(path, model_config, max_lora_rank) -> LoRAAdapter`.

Host only (numpy + safetensors, no jax). A PEFT adapter directory holds `adapter_config.json`
(`r`, `lora_alpha`, `target_modules`, `use_rslora`, ...) and `adapter_model.safetensors` with, per
targeted HF linear layer, `...layers.{i}.{self_attn|mlp}.{name}.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]; PEFT computes `y = W x + scaling * B (A x)` with scaling = alpha / r
(alpha / sqrt(r) with rslora).

`LoRAAdapter.modules` maps each targeted projection to its (A, B) in jaxllm's checkpoint layout
(the unfused `PARAM_AXES` names, input-major like the base weights, every layer stacked):

    "layers.wq": A [L, E, r], B [L, r, H, D]        "layers.wo": A [L, H, D, r], B [L, r, E]
    "layers.wk" / "layers.wv": A [L, E, r], B [L, r, K, D]
    "layers.w_gate" / "layers.w_up": A [L, E, r], B [L, r, F]      "layers.w_down": A [L, F, r], B [L, r, E]

with the scaling folded into B (f32). Layers the adapter does not touch (`layers_to_transform`)
hold zeros. The device side (jaxllm/lora/slots.py) pads the rank, repeats kv heads and fuses.

Every refusal is a ValueError of one line naming the file and the field or tensor. An adapter of a
multimodal checkpoint's text model (Gemma3ForConditionalGeneration: `model.language_model.layers...`,
or `language_model.model.layers...` before transformers 4.52) loads the same way; its vision tower /
projector tensors (PEFT's `target_modules` match SigLIP's q_proj too) are skipped, said in one log
line: only text runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np

from jaxllm.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# HF module name -> (its parent block, jaxllm's checkpoint parameter)
MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "layers.wq"), "k_proj": ("self_attn", "layers.wk"), "v_proj": ("self_attn", "layers.wv"),
    "o_proj": ("self_attn", "layers.wo"), "gate_proj": ("mlp", "layers.w_gate"), "up_proj": ("mlp", "layers.w_up"),
    "down_proj": ("mlp", "layers.w_down"),
}
# adapter_config.json fields that change the math; refused unless at their neutral value
_NEUTRAL = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
            "fan_in_fan_out": (False, None), "lora_bias": (False, None), "rank_pattern": ({}, None),
            "alpha_pattern": ({}, None), "layer_replication": (None, []), "target_parameters": (None, []),
            "use_qalora": (False, None), "trainable_token_indices": (None, {}, [])}
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
                     r"(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# a multimodal checkpoint's image side (skipped: image inputs are not supported)
_VISION = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
# the full module names PEFT's regex target_modules may be written against (text model of a multimodal one too)
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
log = logging.getLogger("jaxllm.lora")


@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
    """name: the adapter's name; rank: its r (<= max_lora_rank); modules: checkpoint param name →
    (A [L, in..., r], B [L, r, out...] f32, scaling folded into B); path: where it was read."""
    name: str
    rank: int
    modules: dict[str, tuple[np.ndarray, np.ndarray]]
    path: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def module_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Checkpoint param name → (input axes, output axes) of one layer's weight (llama_params.param_shapes
    without the layer axis; written out here so that this module imports no jax)."""
    E, F, H, K, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return {"layers.wq": ((E,), (H, D)), "layers.wk": ((E,), (K, D)), "layers.wv": ((E,), (K, D)),
            "layers.wo": ((H, D), (E,)), "layers.w_gate": ((E,), (F,)), "layers.w_up": ((E,), (F,)),
            "layers.w_down": ((F,), (E,))}


def _fail(file: str, msg: str) -> ValueError:
    return ValueError(f"{file}: {msg}")


def _read_config(path: str) -> tuple[str, dict]:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise _fail(path, "LoRA adapter directory not found")
    if not os.path.isfile(file):
        raise _fail(file, "not found (a PEFT adapter directory needs adapter_config.json)")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(file, f"invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _fail(file, "invalid: must hold a JSON object")
    return file, cfg


def _targets(file: str, cfg: dict, num_layers: int) -> set[str]:
    """The HF module names the adapter targets (among MODULES)."""
    tm = cfg.get("target_modules")
    if tm == "all-linear":
        return set(MODULES)
    if isinstance(tm, str):  # PEFT: a regex matched against the full module names
        try:
            return {m for m, (blk, _) in MODULES.items()
                    if any(re.fullmatch(tm, f"{p}layers.{i}.{blk}.{m}") for i in range(num_layers) for p in _PREFIXES)}
        except re.error as e:
            raise _fail(file, f"target_modules={tm!r} is not a valid regex ({e})") from None
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) for t in tm):
        raise _fail(file, f"target_modules={tm!r} is invalid: must be a non-empty list of module names or 'all-linear'")
    out = set()
    for t in tm:
        short = t.rsplit(".", 1)[-1]
        short = short if short in MODULES else f"{short}_proj"
        if short not in MODULES:
            raise _fail(file, f"target module {t!r} is not in this model (LoRA applies to {', '.join(MODULES)})")
        out.add(short)
    return out


def _scaling(file: str, cfg: dict, max_lora_rank: int) -> tuple[int, float]:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _fail(file, f"r={r!r} is invalid: must be an integer >= 1")
    if r > max_lora_rank:
        raise _fail(file, f"r={r} exceeds max_lora_rank={max_lora_rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise _fail(file, f"lora_alpha={alpha!r} is invalid: must be a number")
    return r, float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def load_adapter(path: str, model_config: ModelConfig, max_lora_rank: int, *, name: str | None = None) -> LoRAAdapter:
    """Reads and checks a PEFT LoRA adapter for `model_config` (see the module doc)."""
    c = model_config
    path = os.fspath(path)
    file, cfg = _read_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(file, f"peft_type={cfg.get('peft_type')!r} is not supported (only LORA)")
    for field, neutral in _NEUTRAL.items():
        if field in cfg and cfg[field] not in neutral:
            raise _fail(file, f"{field}={cfg[field]!r} is not supported (must be {neutral[0]!r})")
    rank, scaling = _scaling(file, cfg, max_lora_rank)
    L = c.num_layers
    targets = _targets(file, cfg, L)
    experts = sorted((t for t in targets if MODULES[t][0] == "mlp"), key=list(MODULES).index)
    if c.is_moe and experts:  # an MoE layer's MLP is its experts (jaxllm/models/moe.py): no LoRA hook there
        raise _fail(file, f"target_modules={cfg.get('target_modules')!r} targets {', '.join(experts)}: LoRA on "
                          f"the {c.architecture} MoE expert weights is not supported (attention q/k/v/o_proj only)")
    layers = cfg.get("layers_to_transform")
    layers = list(range(L)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not all(isinstance(i, int) and 0 <= i < L for i in layers):
        raise _fail(file, f"layers_to_transform={cfg.get('layers_to_transform')!r} is invalid: the model has {L} layers")

    wfile = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wfile):
        other = " (adapter_model.bin is not supported: save with safe_serialization=True)" \
            if os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
        raise _fail(wfile, f"not found{other}")
    from safetensors import safe_open

    try:
        handle = safe_open(wfile, framework="numpy")
        keys = list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise _fail(wfile, f"corrupt or truncated safetensors file ({str(e).splitlines()[0][:200]})") from None
    shapes = module_shapes(c)
    found: dict[tuple[str, int, str], str] = {}  # (module, layer, "A"|"B") -> tensor name
    vision = {key for key in keys if _VISION.match(key)}
    if vision:
        log.info("%s: %d vision tower / projector LoRA tensors skipped (image inputs are not supported)", wfile,
                 len(vision))
    for key in keys:
        if key in vision:
            continue
        m = _TENSOR.match(key)
        if m is None:
            raise _fail(wfile, f"tensor {key} is not supported (only lora_A/lora_B of {', '.join(MODULES)})")
        layer, blk, mod, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if mod not in MODULES or MODULES[mod][0] != blk:
            raise _fail(wfile, f"tensor {key}: module {blk}.{mod} is not in this model "
                               f"(LoRA applies to {', '.join(MODULES)})")
        if mod not in targets:
            raise _fail(wfile, f"tensor {key}: {mod} is not in {CONFIG_FILE}'s target_modules")
        if layer >= L:
            raise _fail(wfile, f"tensor {key}: layer {layer} does not exist (the model has {L} layers)")
        found[(mod, layer, ab)] = key

    modules = {}
    for mod in sorted(targets, key=list(MODULES).index):
        param = MODULES[mod][1]
        ins, outs = shapes[param]
        a = np.zeros((L,) + ins + (rank,), np.float32)  # [L, in..., r]
        b = np.zeros((L, rank) + outs, np.float32)  # [L, r, out...]
        for i in layers:
            for ab, want in (("A", (rank, math.prod(ins))), ("B", (math.prod(outs), rank))):
                key = found.get((mod, i, ab))
                if key is None:
                    block = MODULES[mod][0]
                    raise _fail(wfile, f"tensor base_model.model.model.layers.{i}.{block}.{mod}.lora_{ab}.weight "
                                       f"is missing (target {mod}, layer {i})")
                try:
                    t = handle.get_tensor(key)
                except Exception as e:
                    raise _fail(wfile, f"tensor {key} cannot be read: corrupt or truncated "
                                       f"({str(e).splitlines()[0][:200]})") from None
                if tuple(t.shape) != want:
                    raise _fail(wfile, f"tensor {key} has shape {tuple(t.shape)}, the model and r={rank} imply {want}")
                t = np.asarray(t, np.float32)
                if ab == "A":
                    a[i] = t.T.reshape(ins + (rank,))
                else:
                    b[i] = (t.T * np.float32(scaling)).reshape((rank,) + outs)
        modules[param] = (a, b)
    return LoRAAdapter(name or os.path.basename(os.path.normpath(path)), rank, modules, path)
