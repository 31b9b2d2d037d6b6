"""Speculative decoding configuration (host side, no jax): vLLM's ``--speculative-config`` JSON.

Only ``method: "ngram"`` (prompt lookup, jaxllm/core/ngram_proposer.py) is supported:
``{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 1}``.
As vLLM: when only one of prompt_lookup_max / prompt_lookup_min is given the other takes its value;
when neither is, both are 5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16
_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int


def _int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"speculative_config.{name}={v!r} is invalid: must be an integer in [{lo}, {hi}]")
    return v


def parse_speculative_config(value) -> SpeculativeConfig | None:
    """A dict, a JSON object string, or None (no speculation) -> SpeculativeConfig | None;
    ValueError naming the field for anything else."""
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config={value!r} is invalid: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config={value!r} is invalid: must be a JSON object")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise ValueError(f"speculative_config.{unknown[0]} is invalid: unknown field (supported: {list(_FIELDS)})")
    method = value.get("method")
    if method != "ngram":
        raise ValueError(f"speculative_config.method={method!r} is invalid: must be 'ngram' (the only method supported)")
    if "num_speculative_tokens" not in value:
        raise ValueError("speculative_config.num_speculative_tokens is missing: must be an integer in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}]")
    k = _int("num_speculative_tokens", value["num_speculative_tokens"], 1, MAX_SPECULATIVE_TOKENS)
    hi, lo = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
    if hi is None and lo is None:
        hi = lo = 5
    hi = _int("prompt_lookup_max", lo if hi is None else hi, 1, 64)
    lo = _int("prompt_lookup_min", hi if lo is None else lo, 1, 64)
    if lo > hi:
        raise ValueError(f"speculative_config.prompt_lookup_min={lo} is invalid: must be <= prompt_lookup_max={hi}")
    return SpeculativeConfig(method, k, hi, lo)
