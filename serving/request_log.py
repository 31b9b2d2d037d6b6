"""``--enable-log-requests`` (vLLM's flag): one INFO line per admitted request (no jax).

``serving: request <id>: prompt=<text>, prompt_token_ids=<ids>, params=<SamplingParams>[, lora=<name>]``;
the text keeps its first ``--max-log-len`` characters and the ids their first ``--max-log-len`` ids
(``...`` marks a cut). Health probes are not logged."""

from __future__ import annotations

from typing import Any


def clip(value: Any, limit: int | None) -> Any:
    """``value`` (a string or a list of ids) cut to ``limit`` items, ``...`` marking the cut."""
    if limit is None or value is None or len(value) <= limit:
        return value
    return value[:limit] + ("..." if isinstance(value, str) else ["..."])


def request_line(request_id: str, prompt: Any, params: Any, lora: Any, max_log_len: int | None) -> str:
    text, ids = (prompt, None) if isinstance(prompt, str) else (
        (prompt.get("prompt"), prompt.get("prompt_token_ids")) if isinstance(prompt, dict) else (None, prompt))
    parts = [f"serving: request {request_id}: prompt={clip(text, max_log_len)!r}"]
    if ids is not None:
        parts.append(f"prompt_token_ids={clip(list(ids), max_log_len)}")
    parts.append(f"params={params!r}")
    if lora is not None:
        parts.append(f"lora={getattr(lora, 'lora_name', lora)}")
    return ", ".join(parts)
