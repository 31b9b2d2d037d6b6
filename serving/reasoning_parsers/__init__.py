"""Reasoning output parsers (vLLM's ``--reasoning-parser NAME``) for /v1/chat/completions.

Each parser splits a thinking model's generated text into its reasoning (the think block) and
its content (the answer), for a whole output (``extract``) and incrementally while streaming
(``feed`` / ``finish``). Pure Python, no jax. The interface and its contract are in ``base.py``.
"""

from __future__ import annotations

from serving.reasoning_parsers.base import Reasoned, ReasoningDelta, ThinkParser
from serving.reasoning_parsers.think import (DeepSeekR1ReasoningParser, MistralReasoningParser,
                                             Qwen3ReasoningParser)

PARSERS: dict[str, type[ThinkParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, MistralReasoningParser, Qwen3ReasoningParser)
}


def get_parser(name: str) -> type[ThinkParser]:
    """The parser class registered as ``name`` (vLLM's ``--reasoning-parser`` value)."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser={name!r} is invalid: must be one of "
                         f"{', '.join(sorted(PARSERS))}") from None


__all__ = ["PARSERS", "Reasoned", "ReasoningDelta", "ThinkParser", "get_parser"]
