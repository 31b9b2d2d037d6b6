"""vLLM's ``--hf-overrides`` (no jax): a JSON object merged into an HF checkpoint's config.json dict
before jaxllm reads it (``ModelConfig.from_hf``).

Merge rule (vLLM's ``ModelConfig._apply_dict_overrides`` on the parsed ``PretrainedConfig``): a top-level
key replaces the checkpoint's value, a dict-valued parameter such as ``rope_scaling`` or
``quantization_config`` included; a nested *sub-config* (``text_config``, ``vision_config``, ...: a
``*_config`` key whose checkpoint value is an object, ``quantization_config`` excepted, as HF keeps that
one a plain dict) is merged key by key, recursively, so ``{"text_config": {"rms_norm_eps": 1e-5}}``
changes that one field. Only HF safetensors checkpoints take overrides (checkpoints/loader.py refuses
GGUF, Orbax and dummy weights, whose configs are not config.json).

The unconverted-reranker recipe rides on it (jaxllm/models/classifier_config.py):
``{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
"is_original_qwen3_reranker": true}`` on a ``*ForCausalLM`` checkpoint.
"""
from __future__ import annotations

import copy
import json
from typing import Any

FLAG = "--hf-overrides"
_PLAIN_DICTS = ("quantization_config",)  # *_config keys that HF keeps as dicts, not sub-configs


def parse_hf_overrides(value: Any, name: str = FLAG) -> dict | None:
    """``None``, a dict, or JSON text of an object -> a dict (a copy) or None. Raises ValueError in one
    line naming ``name`` (the flag, or ``hf_overrides`` for the Python API) and the value."""
    return parse_json_object(value, name, "config.json keys, e.g. '{\"rms_norm_eps\": 1e-5}'")


def parse_json_object(value: Any, name: str, what: str) -> dict | None:
    """A JSON-object option (``--hf-overrides``, ``--override-generation-config``): None, a dict, or JSON
    text of an object -> a deep copy, or None; ValueError in one line naming ``name`` and the value, and
    saying the object holds ``what``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{named_value(name, value)} is invalid: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{named_value(name, value)} is invalid: must be a JSON object of {what}")
    return copy.deepcopy(value)


def apply_hf_overrides(raw: dict, overrides: dict | None) -> dict:
    """config.json's dict with ``overrides`` merged in (a new dict; ``raw`` is left as it was)."""
    out = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        old = out.get(key)
        if (isinstance(value, dict) and isinstance(old, dict) and key.endswith("_config")
                and key not in _PLAIN_DICTS):
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge(old: dict, new: dict) -> dict:
    """A sub-config updated in place of its fields, nested objects merged too (vLLM's _update_nested)."""
    out = dict(old)
    for key, value in new.items():
        out[key] = _merge(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) \
            else copy.deepcopy(value)
    return out


def named_value(name: str, value: Any) -> str:
    """``--flag 'value'`` for a flag, ``field=value`` for a Python argument (value cut at 120 characters)."""
    return f"{name} {_short(value)}" if name.startswith("--") else f"{name}={_short(value)}"


def _short(value: Any) -> str:
    """A string as repr() writes it (the JSON text given), anything else as its JSON; cut at 120 characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    text = text if len(text) <= 120 else text[:117] + "..."
    return repr(text) if isinstance(value, str) else text
