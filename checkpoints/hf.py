"""HF checkpoint directories: config.json + *.safetensors (single file or sharded with an index)."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from checkpoints.assemble import assemble_params
from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig, ModelConfigError


def read_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: not found (an HF checkpoint directory needs config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc:  # GPTQ/AWQ/fp8/bitsandbytes tensors are not weights assemble_params can read
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise CheckpointError(f"{cfg_path}: the checkpoint is already quantized (quantization_config.quant_method="
                              f"{method!r}), which jaxllm cannot load; use its full-precision checkpoint "
                              f"(with --quantization int8|fp8) or a GGUF")
    try:
        return ModelConfig.from_hf(raw, source=cfg_path)
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None


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


def load_hf_dir(path: str, dtype=np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config = read_config(path)
    handles, where = [], {}
    try:
        for file in _weight_files(path):
            try:
                h = safe_open(file, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
            handles.append(h)
            for name in h.keys():
                where[name] = (file, h)

        def get(name: str):
            if name not in where and name.startswith("model."):
                name = name[len("model."):]  # a base model (LlamaModel, Qwen3Model) saved alone
            if name not in where:
                return None
            file, h = where[name]
            try:
                return h.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name}: corrupt or truncated ({e})") from None

        return config, assemble_params(config, get, source=path, dtype=dtype)
    finally:
        handles.clear()
