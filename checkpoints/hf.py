"""HF checkpoint directories: config.json + *.safetensors (single file or sharded with an index).
A `quantization_config` (or, without one, an older ModelOpt export's hf_quant_config.json) is read by
checkpoints/hf_fp8_config.py: fp8 checkpoints load (their projections kept fp8, checkpoints/hf_fp8.py),
AWQ / GPTQ int4 ones too (kept 4-bit, checkpoints/hf_int4.py), every other kind is refused in one line.
`hf_overrides` (vLLM's --hf-overrides, jaxllm/hf_overrides.py) is merged into config.json's dict before
ModelConfig.from_hf reads it; a `classifier_from_token` (config.json's or the overrides') builds a
classifier's `score` head from LM-head rows (checkpoints/seq_cls_from_lm.py)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
from safetensors import safe_open

from checkpoints.assemble import assemble_params
from checkpoints.errors import CheckpointError
from checkpoints.hf_int4 import Int4Scheme
from checkpoints.hf_names import llama_names, text_model_aliases
from jaxllm.models.config import ModelConfig, ModelConfigError

log = logging.getLogger("jaxllm.checkpoints")


def read_config(path: str, hf_overrides: dict | None = None) -> ModelConfig:
    return _read_config(path, hf_overrides)[0]


def _read_config(path: str, hf_overrides: dict | None = None):
    """→ (ModelConfig, hf_fp8_config.Fp8Scheme or None). `hf_overrides` (vLLM's --hf-overrides) is merged
    into config.json's dict first (jaxllm/hf_overrides.py)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: not found (an HF checkpoint directory needs config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if hf_overrides and isinstance(raw, dict):
        from jaxllm.hf_overrides import apply_hf_overrides

        raw = apply_hf_overrides(raw, hf_overrides)
        cfg_path += " (with --hf-overrides)"
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    scheme = None
    if qc:  # fp8 loads; GPTQ/AWQ/bitsandbytes/int tensors are refused in one line
        from checkpoints.hf_fp8_config import parse

        scheme = parse(qc, cfg_path)
    else:
        scheme = _modelopt_file(path)
    try:
        config = ModelConfig.from_hf(raw, source=cfg_path)
        return config, scheme
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None


def _modelopt_file(path: str):
    """An older ModelOpt export's hf_quant_config.json (read, as vLLM does, when config.json has no
    quantization_config) → its Fp8Scheme, or None when there is no such file."""
    hq_path = os.path.join(path, "hf_quant_config.json")
    if not os.path.isfile(hq_path):
        return None
    try:
        with open(hq_path) as f:
            hq = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{hq_path}: invalid JSON ({e})") from None
    from checkpoints.hf_fp8_config import parse_modelopt

    if not isinstance(hq, dict) or "quantization" not in hq:
        raise CheckpointError(f"{hq_path}: no 'quantization' object (a ModelOpt export's "
                              f"{{\"quantization\": {{\"quant_algo\": ...}}}})")
    return parse_modelopt(hq, hq_path, prefix="")


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    out = []
    for name in files:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: listed in the index but missing")
        out.append(full)
    return out


def load_hf_dir(path: str, dtype=np.float32,
                hf_overrides: dict | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config, params, _ = load_hf(path, dtype, hf_overrides)
    return config, params


def load_hf(path: str, dtype=np.float32, hf_overrides: dict | None = None):
    """→ (config, params, kv_scales). params: {name: array}, an fp8 checkpoint's kept projections as
    QuantWeights of numpy float8_e4m3fn + f32 scales (checkpoints/hf_fp8.py); kv_scales: the
    checkpoint's fp8 KV cache scales (k [L, kv_heads], v [L, kv_heads], their tensor names) or None."""
    from checkpoints import safetensors_f8

    config, scheme = _read_config(path, hf_overrides)
    if config.classifier_from_token:  # a *ForCausalLM loaded as a classifier: its head from LM-head rows
        from checkpoints.seq_cls_from_lm import resolve_token_ids

        config = resolve_token_ids(config, path)
    if scheme is not None and config.architecture == "phi3":
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: quantization_config with model_type 'phi3' "
                              f"is not supported (its fused qkv_proj / gate_up_proj are split only unquantized)")
    handles, where = [], {}
    try:
        for file in _weight_files(path):
            try:
                h = safe_open(file, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
            handles.append(h)
            # the one header pass: every tensor's name and dtype (the float8 check here, which projections
            # stay fp8 in hf_fp8.kept via stored_f8); float8 tensors are read from the bytes (safetensors'
            # numpy loader cannot), the rest through `h`
            header, start = safetensors_f8.read_header(file)
            f8 = safetensors_f8.f8_names(header)
            if f8 and isinstance(scheme, Int4Scheme):  # an AWQ / GPTQ config over float8 tensors
                first = min(f8)
                raise CheckpointError(f"{file}: holds float8 tensors ({first}: {header[first]['dtype']}) but "
                                      f"{os.path.join(path, 'config.json')} says quantization_config.quant_method="
                                      f"{scheme.method!r} (int4 qweight/qzeros/scales)")
            if f8 and scheme is None:
                first = min(f8)
                raise CheckpointError(f"{file}: holds float8 tensors ({first}: {header[first]['dtype']}, "
                                      f"{len(f8)} in all) but {os.path.join(path, 'config.json')} has no "
                                      f"quantization_config (an fp8 checkpoint names its scheme there)")
            for name in header:
                where[name] = (file, h, (header, start) if name in f8 else None)
        aliases = text_model_aliases(where, path)  # Gemma3ForConditionalGeneration's language model

        def stored_name(name: str) -> str:
            if name not in where and name in aliases:
                return aliases[name]
            if name not in where and name.startswith("model."):
                return name[len("model."):]  # a base model (LlamaModel, Qwen3Model) saved alone
            return name

        def stored_f8(name: str) -> bool:
            entry = where.get(stored_name(name))
            return entry is not None and entry[2] is not None

        def raw(name: str):
            name = stored_name(name)
            if name not in where:
                return None
            file, h, f8 = where[name]
            if f8 is not None:
                return safetensors_f8.read_f8(file, *f8, name)
            try:
                return h.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name}: corrupt or truncated ({e})") from None

        if scheme is None:
            get = llama_names(config, raw, path)  # Phi-3's fused qkv_proj / gate_up_proj split (hf_names.py)
            return config, assemble_params(config, get, source=path, dtype=dtype), None
        from checkpoints import hf_fp8, hf_int4

        if isinstance(scheme, hf_int4.Int4Scheme):
            return config, _load_int4(config, raw, scheme, path, dtype), None

        quantized = hf_fp8.assemble_fp8(config, raw, stored_f8, scheme, path)
        experts = {}
        if config.is_moe:  # the experts kept float8 too when every one is stored so (hf_fp8_experts.py)
            from checkpoints.hf_fp8_experts import assemble_fp8_experts

            experts = assemble_fp8_experts(config, raw, stored_f8, scheme, path)
            quantized.update(experts)
        get = hf_fp8.dequantizing(raw, scheme.block, path)
        params = assemble_params(config, get, source=path, dtype=dtype, skip=frozenset(quantized))
        params.update(quantized)
        kept = tuple(s for s, p in hf_fp8.PROJECTIONS.items() if p in quantized)
        deq = sorted(n for n, (_, _, f8) in where.items() if f8 is not None and n.endswith("weight")
                     and not n.endswith(kept) and not (experts and ".experts." in n))
        log.info("%s: fp8 checkpoint (quant_method %r): kept as float8_e4m3fn with %s scales: %s; "
                 "dequantized to fp32: %s%s", path, scheme.method,
                 f"{list(scheme.block)}-block" if scheme.block else "per-tensor/per-channel",
                 ", ".join(sorted(quantized)) or "none", ", ".join(deq) or "none",
                 f"; its {scheme.activations} activation quantization is not run (weight-only: activations "
                 f"stay in the model dtype, input_scale ignored)" if scheme.activations else "")
        return config, params, hf_fp8.kv_scales(config, raw, path)
    finally:
        handles.clear()


def _load_int4(config, raw, scheme, path: str, dtype) -> dict:
    """An AWQ / GPTQ checkpoint: the projections stored 4-bit in every layer kept 4-bit
    (checkpoints/hf_int4.py), any other quantized linear dequantized to fp32, the rest as stored."""
    from checkpoints import hf_int4

    quantized = hf_int4.assemble_int4(config, raw, scheme, path)
    shapes = hf_int4.shapes(config)
    shape_of = lambda name: shapes[name.split(".", 3)[3]][0]  # noqa: E731
    if config.is_moe:  # the experts kept 4-bit too when every one is stored so (hf_int4_experts.py)
        from checkpoints.hf_int4_experts import assemble_int4_experts, expert_shape

        quantized.update(assemble_int4_experts(config, raw, scheme, path))
        shape_of = lambda name: expert_shape(config, name) or shapes[name.split(".", 3)[3]][0]  # noqa: E731
    get = hf_int4.dequantizing(raw, scheme, path, shape_of)
    params = assemble_params(config, get, source=path, dtype=dtype, skip=frozenset(quantized))
    params.update(quantized)
    kinds = sorted({f"{w.q.dtype}{' + offset' if w.offset is not None else ''}" for w in quantized.values()})
    log.info("%s: %s int4 checkpoint (group_size %d): kept 4-bit (%s): %s", path, scheme.method,
             scheme.group_size, ", ".join(kinds) or "-", ", ".join(sorted(quantized)) or "none")
    return params
