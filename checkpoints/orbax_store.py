"""Orbax store of converted parameters: DST/params (Orbax), DST/jaxllm_config.json, DST/tokenizer/."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig

CONFIG_FILE = "jaxllm_config.json"


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save_orbax(dst: str, config: ModelConfig, params: dict[str, np.ndarray], tokenizer=None) -> None:
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    if os.path.exists(os.path.join(dst, "params")):
        raise CheckpointError(f"{dst}: already holds an Orbax checkpoint (remove it first)")
    os.makedirs(dst, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(dst, "params"), {k: np.asarray(v) for k, v in params.items()})
    ckptr.wait_until_finished()
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    if tokenizer is not None:
        tokenizer.save(os.path.join(dst, "tokenizer"))


def read_orbax_config(path: str) -> ModelConfig:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        raw = json.load(f)
    if raw.get("rope_scaling"):
        # JSON gives lists back: the (key, value) pairs and longrope's factor lists become tuples (hashable)
        raw["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in raw["rope_scaling"])
    raw["eos_token_ids"] = tuple(raw.get("eos_token_ids", ()))
    if raw.get("layer_types"):  # Gemma 2/3
        raw["layer_types"] = tuple(raw["layer_types"])
    if "labels" in raw:  # a sequence classifier's id2label (every model writes it: () when none)
        raw["labels"] = tuple(raw["labels"])
    for key in ("classifier_from_token", "classifier_token_ids"):  # an unconverted reranker's
        if key in raw:
            raw[key] = tuple(raw[key])
    return ModelConfig(**raw)


def load_orbax(path: str, dtype, shardings: dict | None = None) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Restores straight onto devices (into `shardings` when given) in `dtype`."""
    import orbax.checkpoint as ocp

    from jaxllm.models.llama_params import param_shapes

    path = os.path.abspath(path)
    config = read_orbax_config(path)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=(shardings or {}).get(name, default))
                for name, shape in param_shapes(config).items()}
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the Orbax checkpoint ({type(e).__name__}: {e})") from None
    return config, params
