"""The reasoning-parser interface: model text -> (reasoning, content), whole or streamed.

Pure Python (no jax). One parser instance reads one output (one choice). ``feed`` takes the next
text fragment and returns the ``ReasoningDelta`` that can be released now; ``finish`` flushes what
was held back. For any split of a text into fragments, the reasoning deltas concatenate to
``extract(text).reasoning or ""`` and the content deltas to ``extract(text).content or ""``:
``extract`` is one ``feed`` of the whole text then ``finish`` on a fresh instance, so a parser only
has to be split-invariant (tests/serving/test_reasoning_parsers.py checks it with hypothesis).

Reasoning always comes before content (a think block opens the output), so a stream sends
reasoning deltas, then content deltas. An empty part is ``None`` (vLLM's ``content or None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from serving.tool_parsers.base import partial_suffix


@dataclass(frozen=True)
class Reasoned:
    reasoning: str | None  # the think block's text (tags dropped); None when there is none / empty
    content: str | None  # the rest; None when empty


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ThinkParser:
    """``<think>...</think>`` read in one pass; subclasses say what an output without tags is.

    States: ``"start"`` (the output's beginning: leading whitespace and a possible ``START`` are
    held until it is known whether the output opens with ``START``), ``"think"`` (inside the
    block: text is reasoning, an end that may begin ``END`` is held), ``"answer"`` (content).
    ``implicit_start``: an output that does not open with ``START`` is reasoning up to ``END``
    anyway (the chat template put ``START`` in the prompt); otherwise it is all content.
    """

    name: ClassVar[str] = ""
    START: ClassVar[str] = "<think>"
    END: ClassVar[str] = "</think>"
    implicit_start: ClassVar[bool] = False
    # a chat_template_kwargs key that, set to false, means the model does not think (all content)
    thinking_switch: ClassVar[str | None] = None
    # the tags are special tokens in the model's vocabulary: decode them (skip_special_tokens=False)
    special_markers: ClassVar[bool] = False

    def __init__(self) -> None:
        self._state = "start"
        self._ws = ""  # "start": the leading whitespace seen so far
        self._hold = ""  # "start": what follows it (a proper prefix of START); "think": a possible start of END
        self._finished = False

    # -- public API --------------------------------------------------------------------------
    def extract(self, text: str) -> Reasoned:
        """Parse a whole output at once (does not touch this instance's streaming state)."""
        p = type(self)()
        a, b = p.feed(text), p.finish()
        r, c = a.reasoning + b.reasoning, a.content + b.content
        return Reasoned(r or None, c or None)

    def feed(self, delta: str) -> ReasoningDelta:
        """Streaming: the next text fragment; returns what can be released now."""
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}.feed after finish(): one parser per output")
        out = ReasoningDelta()
        if delta:
            self._feed(delta, out)
        return out

    def finish(self) -> ReasoningDelta:
        """Streaming: end of output; releases held text. A block left open (the output was cut
        off while thinking) is all reasoning, as vLLM streams it."""
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}.finish called twice: one parser per output")
        self._finished = True
        out = ReasoningDelta()
        if self._state == "start":  # the whole output was whitespace or a proper prefix of START
            self._begin(out, opened=False, rest=self._ws + self._hold)
        if self._state == "think":
            out.reasoning += self._hold
        self._hold = ""
        return out

    # -- the machine -------------------------------------------------------------------------
    def _begin(self, out: ReasoningDelta, opened: bool, rest: str) -> None:
        """The beginning is decided: ``opened`` = it was ``START``; ``rest`` follows it."""
        self._ws = self._hold = ""
        self._state = "think" if opened or self.implicit_start else "answer"
        if rest:
            self._feed(rest, out)

    def _feed(self, delta: str, out: ReasoningDelta) -> None:
        if self._state == "start":
            if self._hold:  # the tag has begun: whitespace now belongs to the body
                body = self._hold + delta
            else:  # more leading whitespace (kept apart: no rescans of a long run of it)
                body = delta.lstrip()
                self._ws += delta[: len(delta) - len(body)]
            if body.startswith(self.START):
                self._begin(out, True, body[len(self.START):])
            elif body and not self.START.startswith(body):
                self._begin(out, False, self._ws + body)
            else:
                self._hold = body
        elif self._state == "think":
            text = self._hold + delta
            i = text.find(self.END)
            if i < 0:
                k = partial_suffix(text, self.END)
                out.reasoning += text[: len(text) - k]
                self._hold = text[len(text) - k:]
                return
            out.reasoning += text[:i]
            self._hold = ""
            self._state = "answer"
            out.content += text[i + len(self.END):]
        else:
            out.content += delta
