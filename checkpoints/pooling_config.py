"""An embedding checkpoint's pooling, from its sentence-transformers files (what Qwen3-Embedding,
e5-mistral and most HF embedding repos ship beside config.json):

- ``modules.json``: the pipeline; a ``sentence_transformers.models.Pooling`` module's ``path``
  (usually ``1_Pooling``) holds ``config.json`` with ``pooling_mode_lasttoken`` /
  ``pooling_mode_mean_tokens`` flags; a ``sentence_transformers.models.Normalize`` module means
  the vectors are L2-normalised.

``read_pooling_config(dir) -> (pooling_type, normalize) | None`` (None: no such files).

``read_matryoshka(dir) -> (is_matryoshka, matryoshka_dimensions | None)``: vLLM's Matryoshka keys,
``is_matryoshka`` and ``matryoshka_dimensions``, from ``config.json``, else from
``config_sentence_transformers.json``; a model with ``matryoshka_dimensions`` is Matryoshka.
"""
from __future__ import annotations

import json
import os

from checkpoints.errors import CheckpointError

_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN"}
_UNSUPPORTED = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_pooling_config(path: str) -> tuple[str, bool] | None:
    modules_path = os.path.join(path, "modules.json")
    if not os.path.isdir(path) or not os.path.isfile(modules_path):
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_path}: must be a JSON list of modules")
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    normalize = "Normalize" in types
    pooling = types.get("Pooling")
    if pooling is None:
        return None
    cfg_path = os.path.join(path, str(pooling.get("path", "1_Pooling")), "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: not found (named by the Pooling module of {modules_path})")
    cfg = _read_json(cfg_path)
    for flag in _UNSUPPORTED:
        if cfg.get(flag):
            raise CheckpointError(f"{cfg_path}: {flag}=true is not supported (jaxllm pools LAST or MEAN)")
    modes = [t for flag, t in _MODES.items() if cfg.get(flag)]
    if len(modes) != 1:
        raise CheckpointError(f"{cfg_path}: exactly one of {', '.join(_MODES)} must be true")
    return modes[0], normalize


def read_matryoshka(path: str) -> tuple[bool, list[int] | None]:
    for name in ("config.json", "config_sentence_transformers.json"):
        f = os.path.join(path, name)
        cfg = _read_json(f) if os.path.isfile(f) else None
        if not isinstance(cfg, dict) or not ("is_matryoshka" in cfg or "matryoshka_dimensions" in cfg):
            continue
        dims = cfg.get("matryoshka_dimensions")
        if dims is not None and (not isinstance(dims, list) or not dims or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)):
            raise CheckpointError(f"{f}: matryoshka_dimensions={dims!r} is invalid: must be a non-empty "
                                  "list of integers >= 1")
        return bool(cfg.get("is_matryoshka")) or bool(dims), (sorted(set(dims)) if dims else None)
    return False, None
