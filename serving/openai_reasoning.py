"""Reasoning outputs of /v1/chat/completions (``--reasoning-parser NAME``; no jax), as vLLM's.

* **Fields**: the answer's message (and each streamed delta) carries the think block's text in
  ``reasoning`` and the rest in ``content`` (vLLM renamed ``reasoning_content`` to ``reasoning``
  and has since removed the old name; so is it here). Non-streamed: ``reasoning`` is ``None``
  when there is none, ``content`` is ``None`` when the answer is only reasoning. Streamed:
  reasoning deltas, then content deltas. ``include_reasoning=false`` (vLLM's body field) drops
  the reasoning from the answer (it is still generated). Usage counts all completion tokens and,
  as current vLLM under a reasoning parser, ``completion_tokens_details.reasoning_tokens``: the
  tokens of the think block (tags excluded), found by the tags' token ids in each choice's output
  (:meth:`ReasoningPlan.reasoning_tokens`), summed over choices.
* **No reasoning** (the whole output is content) when the prompt already closed it (the template
  wrote ``<think></think>``: the prompt ends with the end tag and whitespace) or the request
  switched thinking off (the parser's ``thinking_switch`` in ``chat_template_kwargs`` set to
  false, e.g. qwen3's ``enable_thinking``). vLLM's ``is_reasoning_end(prompt)`` takes the last
  tag anywhere in the prompt, so a block of an earlier turn kept in the history (Qwen3's
  template keeps it in tool loops) would end this one's reasoning there; not here.
* **Tools**: the tool reader reads only the content part (after the reasoning).
* **Constraints** (``response_format`` / ``structured_outputs`` / tool_choice named or required):
  only the text after the reasoning is constrained: the constraint gets ``reasoning_end`` (the
  end tag's token ids) and the engine's grammar stays idle until they appear in the output
  (jaxllm/structured_outputs.py). Not when there is no reasoning (above): constrained from the start.
"""

from __future__ import annotations

from typing import Any

from serving.reasoning_parsers import ThinkParser, get_parser


class ReasoningPlan:
    """One chat body's reasoning split: per choice index, one parser over its text."""

    def __init__(self, parser: type[ThinkParser], include: bool, off: bool, tokenizer: Any = None):
        self.parser = parser
        self.include = include  # include_reasoning
        self.off = off  # no reasoning: the whole output is content
        self.tokenizer = tokenizer
        self._streams: dict[int, ThinkParser] = {}
        self._tag_ids: tuple[list[int], list[int]] | None = None  # (START ids, END ids), on first use

    @classmethod
    def from_body(cls, body: Any, cfg: Any, prompt: dict, tokenizer: Any) -> "ReasoningPlan | None":
        if not cfg.reasoning_parser:
            return None
        parser = get_parser(cfg.reasoning_parser)
        text = prompt.get("prompt")
        if text is None:
            text = tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False)
        ended = text.rstrip().endswith(parser.END)  # not a block closed in an earlier turn
        switch = parser.thinking_switch
        off = switch is not None and (body.chat_template_kwargs or {}).get(switch) is False
        return cls(parser, body.include_reasoning, ended or off, tokenizer)

    def adjust(self, params: Any, body: Any, tokenizer: Any) -> None:
        """Tags that are special tokens are decoded (unless the body set ``skip_special_tokens``);
        a constrained request's constraint starts after the end of the reasoning."""
        if self.parser.special_markers and body.skip_special_tokens is None:
            params.skip_special_tokens = False
        spec = params.structured_outputs
        if spec is None or self.off:
            return
        ids = self._tags()[1]
        if not ids:
            raise ValueError(f"reasoning_parser={self.parser.name!r} is invalid for constrained outputs on this "
                             f"model: its tokenizer encodes {self.parser.END!r} as no tokens")
        spec.reasoning_end = ids

    # ----- answers ----------------------------------------------------------------------------
    def split(self, text: str) -> tuple[str | None, str]:
        """A whole choice's (reasoning or None, content text)."""
        if self.off:
            return None, text
        r = self.parser().extract(text)
        return (r.reasoning if self.include else None), r.content or ""

    def delta(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """Choice ``index``'s new text -> (reasoning delta, content delta); ``final`` flushes."""
        if self.off:
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

    # ----- usage -------------------------------------------------------------------------------
    def reasoning_tokens(self, text: str, token_ids: list[int], stopped: bool) -> int:
        """Tokens of one choice's think block: those before the end tag's ids (all of them when
        it never came; an EOS that ``stopped`` it excluded), less a leading start tag's ids.
        ``text`` (the choice's text) decides whether there is a block at all."""
        if self.off or self.parser().extract(text).reasoning is None:
            return 0
        start, end = self._tags()
        ids = list(token_ids)
        i = _find(ids, end)
        if i < 0:
            i = len(ids) - (1 if stopped and ids and ids[-1] in _eos(self.tokenizer) else 0)
        head = ids[:i]
        k = _find(head, start)
        if k >= 0 and not self.tokenizer.decode(head[:k], skip_special_tokens=False).strip():
            head = head[k + len(start):]
        return len(head)

    def _tags(self) -> tuple[list[int], list[int]]:
        if self._tag_ids is None:
            enc = self.tokenizer.encode
            self._tag_ids = ([int(t) for t in enc(self.parser.START, add_special_tokens=False)],
                             [int(t) for t in enc(self.parser.END, add_special_tokens=False)])
        return self._tag_ids


def _find(ids: list[int], seq: list[int]) -> int:
    """Where ``seq`` first occurs in ``ids`` (-1: nowhere, or ``seq`` is empty)."""
    n = len(seq)
    if not n:
        return -1
    for i in range(len(ids) - n + 1):
        if ids[i] == seq[0] and ids[i:i + n] == seq:
            return i
    return -1


def _eos(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "eos_token_ids", None) or ())
