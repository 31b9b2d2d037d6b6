"""The ``<think>...</think>`` reasoning parsers (vLLM's ``--reasoning-parser`` names).

* ``deepseek_r1`` (DeepSeek-R1 and its distills): the block's opening ``<think>`` may be absent
  because the chat template already wrote it at the end of the prompt; then everything up to
  ``</think>`` is reasoning. Without ``</think>`` the whole output is reasoning and content is
  ``None`` (vLLM's rule: the model was cut off while thinking).
* ``qwen3`` (Qwen3, SmolLM3-style templates): a block counts only when the output opens with
  ``<think>`` (leading whitespace allowed); an output that does not is all content, which is what
  ``chat_template_kwargs={"enable_thinking": false}`` gives (the template writes an empty block
  into the prompt, the model answers directly). vLLM's whole-output rule for an open block with
  no ``</think>`` is "all content, tags included" while its stream sends that text as reasoning;
  here both answers agree on reasoning (a stream cannot take reasoning deltas back).

Text after ``</think>`` is content as written (vLLM does not strip the ``\\n\\n`` models put
there). A second ``<think>`` inside the block, or ``</think>`` in the content, is plain text.
"""

from __future__ import annotations

from serving.reasoning_parsers.base import ThinkParser


class DeepSeekR1ReasoningParser(ThinkParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3ReasoningParser(ThinkParser):
    name = "qwen3"
    implicit_start = False
