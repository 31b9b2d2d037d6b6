"""``mistral``: Mistral / Mixtral tool calls after the ``[TOOL_CALLS]`` token.

Formats (text before and after is content; several ``[TOOL_CALLS]`` groups may follow each other)::

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]
    [TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]f{}          (tokenizer v11+)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                     (tokenizer v13+)

The first is an array of ``{"name", "arguments"}`` objects (``arguments`` may also be a JSON
string of an object); in the others the name (letters, digits, ``_ - .``; at most 128) is written
right before its arguments object. A group that does not parse (bad JSON, an element without a
name, a name without an object after it) is content, ``[TOOL_CALLS]`` included, and reading
goes on after it. The server must not skip special tokens for this parser: ``[TOOL_CALLS]`` is one.

Streaming: text that may begin ``[TOOL_CALLS]`` (or ``[ARGS]`` after a name) is held back. In the
name-then-object formats a group whose object begins ``{"`` or ``{}`` (whitespace allowed after
the ``{``) is released as the call's name at that point, then its arguments as the model writes
them (``stream_args.py``: the same text the whole parse answers); a group that breaks after its
name was sent stays a call with the arguments up to the break, the text up to where the object's
brackets close (or to the end of the output) is not content, and reading goes on after it. Any
other object (``f{1: 2}``) is held until it closes and judged whole, as is an array group: its
elements are all calls or the whole group is content, which a stream that already sent an element
could not honour.
"""

from __future__ import annotations

import json
import re

from serving.tool_parsers.base import (ToolCall, ToolDelta, ToolParser, dump_args, make_call,
                                       partial_suffix)
from serving.tool_parsers.scan import Scanner
from serving.tool_parsers.stream_args import ArgsStreamer

MARK = "[TOOL_CALLS]"
ARGS = "[ARGS]"
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


def parse_array(body: str) -> list[ToolCall] | None:
    try:
        items = json.loads(body)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [make_call(item, ("arguments",)) for item in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def parse_args(name: str, body: str) -> ToolCall | None:
    try:
        args = json.loads(body)
    except ValueError:
        return None
    return ToolCall(name, dump_args(args)) if isinstance(args, dict) else None


class MistralToolParser(ToolParser):
    name = "mistral"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        # out: content; after: just after [TOOL_CALLS]; name: reading a name; mark: maybe [ARGS];
        # brace: after [ARGS]; head: the arguments' "{" read, streamable or not yet known;
        # array / args: inside the array / the arguments object, held whole; stream: streaming them
        self._state = "out"
        self._hold = ""  # out: an end that may begin [TOOL_CALLS]; mark: one that may be [ARGS]
        self._raw: list[str] = []  # the group's text before its array / object
        self._name = ""
        self._args_mark = ""  # "[ARGS]" once read after the name
        self._obj: list[str] = []
        self._scanner = Scanner()
        self._stream: ArgsStreamer | None = None  # stream: the call's arguments
        self._index = -1  # stream: the call's index

    def _feed(self, delta: str, out: ToolDelta) -> None:
        while delta:
            state = self._state
            if state == "out":
                text, self._hold = self._hold + delta, ""
                i = text.find(MARK)
                if i < 0:
                    k = partial_suffix(text, MARK)
                    self._content(out, text[: len(text) - k])
                    self._hold = text[len(text) - k:]
                    return
                self._content(out, text[:i])
                self._raw, self._name, self._state = [MARK], "", "after"
                delta = text[i + len(MARK):]
            elif state == "after":
                rest = delta.lstrip()
                self._raw.append(delta[: len(delta) - len(rest)])
                if not rest:
                    return
                if rest[0] == "[":
                    self._open("array")
                    delta = rest
                elif _NAME.match(rest).end():
                    self._state = "name"
                    delta = rest
                else:
                    delta = self._fail(out, rest)
            elif state == "name":
                n = _NAME.match(delta).end()
                self._name += delta[:n]
                rest = delta[n:]
                if len(self._name) > MAX_NAME:
                    delta = self._fail(out, rest)
                elif not rest:
                    return
                elif rest[0] == "{":
                    self._open("head")
                    delta = rest
                elif rest[0] == "[":
                    self._state = "mark"
                    delta = rest
                else:
                    delta = self._fail(out, rest)
            elif state == "mark":  # after a name: "[" that may begin [ARGS]
                text, self._hold = self._hold + delta, ""
                if text.startswith(ARGS):
                    self._args_mark = ARGS
                    self._state = "brace"
                    delta = text[len(ARGS):]
                elif ARGS.startswith(text):
                    self._hold = text
                    return
                else:
                    delta = self._fail(out, text)
            elif state == "brace":  # after [ARGS]: the object must follow
                if delta[0] == "{":
                    self._open("head")
                else:
                    delta = self._fail(out, delta)
            elif state == "head":  # the arguments object so far: "{" and whitespace
                text = "".join(self._obj) + delta
                rest = text[1:].lstrip()
                if not rest:
                    self._obj = [text]
                    return
                if rest[0] in '"}':  # a key or the end: stream from here (the scanner starts over)
                    self._state, self._obj, self._stream = "stream", [], ArgsStreamer()
                    self._index = self._open_call(out, self._name)
                else:  # not an object of keys: held whole and judged at its end
                    self._state, self._obj = "args", []
                delta = text
            elif state == "stream":
                end = self._scanner.scan(delta)
                self._args(out, self._index, self._stream.feed(delta if end is None else delta[:end]))
                if end is None:
                    return
                delta = delta[end:]  # the streamed call stands as sent
                self._stream = None
                self._reset()
            else:  # array / args
                end = self._scanner.scan(delta)
                if end is None:
                    self._obj.append(delta)
                    return
                body = "".join(self._obj) + delta[:end]
                delta = delta[end:]
                self._obj = []
                if state == "array":
                    calls = parse_array(body)
                else:
                    one = parse_args(self._name, body)
                    calls = None if one is None else [one]
                if calls is None:
                    self._content(out, self._group() + body)
                else:
                    for c in calls:
                        self._call(out, c)
                self._reset()

    def _open(self, state: str) -> None:
        self._state = state
        self._scanner = Scanner()
        self._obj = []

    def _group(self) -> str:
        return "".join(self._raw) + self._name + self._args_mark

    def _reset(self) -> None:
        self._raw, self._name, self._args_mark, self._hold, self._state = [], "", "", "", "out"

    def _fail(self, out: ToolDelta, rest: str) -> str:
        """The group so far is content; ``rest`` is read again as plain text."""
        self._content(out, self._group())
        self._reset()
        return rest

    def _finish(self, out: ToolDelta) -> None:
        if self._state == "out":
            self._content(out, self._hold)
        elif self._state != "stream":  # a streamed call stands as sent, its object's rest dropped
            self._content(out, self._group() + self._hold + "".join(self._obj))
