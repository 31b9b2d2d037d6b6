"""Tool-call output parsers (vLLM's ``--tool-call-parser NAME``) for ``tool_choice="auto"``.

Each parser splits a model's generated text into plain content and tool calls, for a whole output
(``extract``) and incrementally while streaming (``feed`` / ``finish``). Pure Python, no jax.
The interface and its contract are in ``base.py``; one file per format.

Some markers are special tokens (``[TOOL_CALLS]`` in Mistral's tokenizers, ``<|python_tag|>`` in
Llama's; ``<tool_call>`` in some Hermes-style ones): like vLLM when ``tools`` are given, decode
the output with ``skip_special_tokens=False`` so that a parser sees them.
"""

from __future__ import annotations

from serving.tool_parsers.base import (CallDelta, Extracted, ToolCall, ToolDelta, ToolParser,
                                       tool_names)
from serving.tool_parsers.hermes import HermesToolParser
from serving.tool_parsers.llama3_json import Llama3JsonToolParser
from serving.tool_parsers.mistral import MistralToolParser
from serving.tool_parsers.pythonic import PythonicToolParser
from serving.tool_parsers.qwen3_coder import Qwen3CoderToolParser

PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser,
                         PythonicToolParser, Qwen3CoderToolParser)
}
# vLLM's other names for the same formats
PARSERS["llama4_json"] = Llama3JsonToolParser
PARSERS["llama4_pythonic"] = PythonicToolParser
PARSERS["qwen3_xml"] = Qwen3CoderToolParser  # vLLM's streaming-XML parser of the same format


def get_parser(name: str) -> type[ToolParser]:
    """The parser class registered as ``name`` (vLLM's ``--tool-call-parser`` value)."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"tool_call_parser={name!r} is invalid: must be one of "
                         f"{', '.join(sorted(PARSERS))}") from None


__all__ = ["CallDelta", "Extracted", "PARSERS", "ToolCall", "ToolDelta", "ToolParser",
           "get_parser", "tool_names"]
