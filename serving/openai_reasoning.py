"""Reasoning outputs of /v1/chat/completions (``--reasoning-parser NAME``; no jax), as vLLM's.

* **Fields**: the answer's message (and each streamed delta) carries the think block's text in
  ``reasoning`` and the rest in ``content`` (vLLM renamed ``reasoning_content`` to ``reasoning``
  and has since removed the old name; so is it here). Non-streamed: ``reasoning`` is ``None``
  when there is none, ``content`` is ``None`` when the answer is only reasoning. Streamed:
  reasoning deltas, then content deltas. ``include_reasoning=false`` (vLLM's body field) drops
  the reasoning from the answer (it is still generated). Usage counts all completion tokens.
* **Prompt that already closed the reasoning** (the template wrote ``<think></think>``, e.g.
  Qwen3 with ``chat_template_kwargs={"enable_thinking": false}``; the last think marker of the
  prompt is the end tag): the whole output is content, as vLLM's ``is_reasoning_end(prompt)``.
* **Tools**: the tool reader reads only the content part (after the reasoning).
* **Constraints** (``response_format`` / ``structured_outputs`` / tool_choice named or required):
  only the text after the reasoning is constrained: the constraint gets ``reasoning_end`` (the
  end tag's token ids) and the engine's grammar stays idle until they appear in the output
  (jaxllm/structured_outputs.py). Not when the prompt already closed the reasoning.
"""

from __future__ import annotations

from typing import Any

from serving.reasoning_parsers import ThinkParser, get_parser


class ReasoningPlan:
    """One chat body's reasoning split: per choice index, one parser over its text."""

    def __init__(self, parser: type[ThinkParser], include: bool, ended_in_prompt: bool):
        self.parser = parser
        self.include = include  # include_reasoning
        self.ended_in_prompt = ended_in_prompt  # the whole output is content
        self._streams: dict[int, ThinkParser] = {}

    @classmethod
    def from_body(cls, body: Any, cfg: Any, prompt: dict, tokenizer: Any) -> "ReasoningPlan | None":
        if not cfg.reasoning_parser:
            return None
        parser = get_parser(cfg.reasoning_parser)
        text = prompt.get("prompt")
        if text is None:
            text = tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False)
        ended = text.rfind(parser.END) > text.rfind(parser.START)
        return cls(parser, body.include_reasoning, ended)

    def adjust(self, params: Any, tokenizer: Any) -> None:
        """A constrained request's constraint starts after the end of the reasoning."""
        spec = params.structured_outputs
        if spec is None or self.ended_in_prompt:
            return
        ids = [int(t) for t in tokenizer.encode(self.parser.END, add_special_tokens=False)]
        if not ids:
            raise ValueError(f"reasoning_parser={self.parser.name!r} is invalid for constrained outputs on this "
                             f"model: its tokenizer encodes {self.parser.END!r} as no tokens")
        spec.reasoning_end = ids

    # ----- answers ----------------------------------------------------------------------------
    def split(self, text: str) -> tuple[str | None, str]:
        """A whole choice's (reasoning or None, content text)."""
        if self.ended_in_prompt:
            return None, text
        r = self.parser().extract(text)
        return (r.reasoning if self.include else None), r.content or ""

    def delta(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """Choice ``index``'s new text -> (reasoning delta, content delta); ``final`` flushes."""
        if self.ended_in_prompt:
            return "", text
        p = self._streams.get(index)
        if p is None:
            p = self._streams[index] = self.parser()
        d = p.feed(text)
        reasoning, content = d.reasoning, d.content
        if final:
            d = p.finish()
            reasoning, content = reasoning + d.reasoning, content + d.content
        return (reasoning if self.include else ""), content
