"""The ``<think>...</think>`` reasoning parsers (vLLM's ``--reasoning-parser`` names).

* ``deepseek_r1`` (DeepSeek-R1 and its distills): the block's opening ``<think>`` may be absent
  because the chat template already wrote it at the end of the prompt; then everything up to
  ``</think>`` is reasoning. Without ``</think>`` the whole output is reasoning and content is
  ``None`` (vLLM's rule: the model was cut off while thinking).
* ``qwen3`` (Qwen3, Qwen3.5, QwQ; SmolLM3-style templates): the same reading, as current vLLM
  does it (its Qwen3.5 and 2507 "Thinking" templates put ``<think>`` in the prompt, so only
  ``</think>`` is generated). Thinking switched off by the request
  (``chat_template_kwargs={"enable_thinking": false}``: ``thinking_switch``) makes the whole
  output content, as does a prompt whose template already closed the block (what that switch
  renders); serving/openai_reasoning.py applies both. Older vLLM required both tags (no
  ``<think>`` = all content); current vLLM does not, and neither does this.

* ``mistral`` (Magistral): ``[THINK]...[/THINK]``, special tokens in Mistral's vocabularies (so,
  like vLLM, the answer is decoded with ``skip_special_tokens=False`` unless the request sets it).
  The block counts only when the output opens with ``[THINK]`` (leading whitespace allowed);
  otherwise all is content. vLLM's parser also takes ``[THINK]`` later in the text (the text
  before it becomes content) and drops a ``[/THINK]`` that has no ``[THINK]``; here both stay
  content (a well-prompted model writes neither).

Text after the end tag is content as written (vLLM does not strip the ``\\n\\n`` models put
there). A second start tag inside the block, or an end tag in the content, is plain text.
"""

from __future__ import annotations

from serving.reasoning_parsers.base import ThinkParser


class DeepSeekR1ReasoningParser(ThinkParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3ReasoningParser(ThinkParser):
    name = "qwen3"
    implicit_start = True
    thinking_switch = "enable_thinking"


class MistralReasoningParser(ThinkParser):
    name = "mistral"
    START = "[THINK]"
    END = "[/THINK]"
    implicit_start = False
    special_markers = True
