"""The tool-parser interface: model text -> plain content + tool calls, whole or streamed.

Pure Python (no jax). One parser instance reads one output (one choice). ``feed`` takes the next
text fragment and returns what can be released now; ``finish`` flushes what was held back. For
any split of a text into fragments, the content deltas concatenate to ``extract(text).content or
""`` and, per call index, the name and the argument fragments to ``extract(text).calls``:
``extract`` is one ``feed`` of the whole text then ``finish`` on a fresh instance, so the parsers
only have to be split-invariant, which tests/serving/test_tool_parsers*.py check with hypothesis.

Content that is only whitespace is ``None`` (vLLM's "no content"); while streaming, whitespace is
held back until a non-whitespace character of content arrives, then released with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from serving.tool_parsers.stream_args import ArgsStreamer, head


@dataclass(frozen=True)
class ToolCall:
    """One complete call. ``arguments``: JSON text of the arguments object."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Extracted:
    content: str | None  # text outside tool calls; None when there is none / only whitespace
    calls: list[ToolCall]


@dataclass(frozen=True)
class CallDelta:
    index: int  # 0, 1, ... in order of appearance in this output
    name: str | None  # set exactly once per index, in the first delta of that index
    arguments: str  # a fragment; an index's fragments concatenate to its ToolCall.arguments


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


class ToolParser:
    """Base class. Subclasses implement ``_feed(delta, out)`` and ``_finish(out)`` and report
    through ``_content`` and ``_call``; they never look at the whole text again (no rescans)."""

    name: ClassVar[str] = ""

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools
        self.tool_names = frozenset(tool_names(tools))  # informative: unknown names stay calls
        self._next_index = 0
        self._held_ws: list[str] = []  # whitespace-only content not released yet
        self._spoke = False  # some non-whitespace content was released
        self._finished = False
        # a JSON call object streamed from its head (_stream_head: hermes, llama3_json)
        self._mode = "head"  # head (undecided), args (streaming a call), whole (judged at its end)
        self._parts: list[str] = []  # head / whole: the object's text so far
        self._stream: Any = None  # args: the call's stream_args.ArgsStreamer
        self._index = -1  # args: the call's index

    # -- public API --------------------------------------------------------------------------
    def extract(self, text: str) -> Extracted:
        """Parse a whole output at once (does not touch this instance's streaming state)."""
        p = type(self)(self.tools)
        deltas = [p.feed(text), p.finish()]
        content = "".join(d.content for d in deltas)
        names: list[str] = []
        args: list[list[str]] = []
        for d in deltas:
            for c in d.calls:
                if c.name is not None:
                    names.append(c.name)
                    args.append([])
                args[c.index].append(c.arguments)
        calls = [ToolCall(n, "".join(a)) for n, a in zip(names, args)]
        return Extracted(content if content and not content.isspace() else None, calls)

    def feed(self, delta: str) -> ToolDelta:
        """Streaming: the next text fragment; returns what can be released now."""
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}.feed after finish(): one parser per output")
        out = ToolDelta()
        if delta:
            self._feed(delta, out)
        return out

    def finish(self) -> ToolDelta:
        """Streaming: end of output; releases held text (as content or as calls)."""
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}.finish called twice: one parser per output")
        self._finished = True
        out = ToolDelta()
        self._finish(out)
        self._held_ws = []  # content that was only whitespace is no content
        return out

    @property
    def num_calls(self) -> int:
        """Calls released so far (for ``finish_reason="tool_calls"``)."""
        return self._next_index

    # -- for subclasses ----------------------------------------------------------------------
    def _feed(self, delta: str, out: ToolDelta) -> None:
        raise NotImplementedError

    def _finish(self, out: ToolDelta) -> None:
        raise NotImplementedError

    def _content(self, out: ToolDelta, text: str) -> None:
        if not text:
            return
        if self._spoke:
            out.content += text
        elif text.isspace():
            self._held_ws.append(text)
        else:
            out.content += "".join(self._held_ws) + text
            self._held_ws = []
            self._spoke = True

    def _call(self, out: ToolDelta, call: ToolCall) -> None:
        out.calls.append(CallDelta(self._next_index, call.name, call.arguments))
        self._next_index += 1

    def _open_call(self, out: ToolDelta, name: str) -> int:
        """A call whose arguments will follow in pieces (``_args``): its index."""
        out.calls.append(CallDelta(self._next_index, name, ""))
        self._next_index += 1
        return self._next_index - 1

    def _start_head(self) -> None:
        """A call object begins: undecided (``head``) until its first characters say how to read it."""
        self._mode, self._parts, self._stream = "head", [], None

    def _stream_head(self, out: ToolDelta, piece: str) -> bool:
        """The next characters of a call object (none past its end), for the parsers whose calls
        are ``{"name": ..., "arguments": {...}}`` objects. ``head``: held until
        ``stream_args.head`` decides: ``commit`` opens the call (its name, now) and streams its
        arguments from then on (``args``); ``fallback`` holds the whole object (``whole``) in
        ``self._parts`` for the parser to judge at its end. True when this piece committed."""
        if not piece:
            return False
        if self._mode == "args":
            self._args(out, self._index, self._stream.feed(piece))
            return False
        self._parts.append(piece)
        if self._mode == "whole":
            return False
        body = "".join(self._parts)  # head: short (stream_args.HEAD_LIMIT decides within it)
        verdict, name, at = head(body)
        if verdict == "commit":
            self._mode, self._parts, self._stream = "args", [], ArgsStreamer()
            self._index = self._open_call(out, name)
            self._args(out, self._index, self._stream.feed(body[at:]))
            return True
        if verdict == "fallback":
            self._mode = "whole"
        return False

    def _args(self, out: ToolDelta, index: int, fragment: str) -> None:
        """The next arguments fragment of call ``index`` (joined to this delta's last one of it)."""
        if not fragment:
            return
        last = out.calls[-1] if out.calls else None
        if last is not None and last.index == index:
            out.calls[-1] = CallDelta(index, last.name, last.arguments + fragment)
        else:
            out.calls.append(CallDelta(index, None, fragment))


def tool_names(tools: list[dict] | None) -> list[str]:
    """Function names of an OpenAI ``tools`` list (entries without one are skipped)."""
    names = []
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


def make_call(obj: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A decoded ``{"name": str, "arguments": {...}}`` -> ToolCall; None when it is not one.

    The arguments may sit under any of ``arg_keys`` (first present wins), may be a JSON string of
    an object (some models stringify them), and default to ``{}`` when absent."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for k in arg_keys:
        if k in obj:
            args = obj[k]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, dump_args(args))


def dump_args(args: Any) -> str:
    """JSON text of an arguments object (or any JSON value): characters as they are, except that a lone surrogate
    (``"\\ud800"`` alone is valid JSON) would make the text unencodable: then all is escaped."""
    text = json.dumps(args, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(args)
    return text


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
