"""``llama3_json``: Llama 3.1 / 3.2 (and 4) JSON tool calls.

Format: the output *starts* (after whitespace) with an optional ``<|python_tag|>`` and then one or
more JSON objects separated by ``;``::

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}

Each object has a string ``name`` and a ``parameters`` (or ``arguments``) object. An output that
starts with anything else is all content (as vLLM streams it; vLLM's non-streaming path also digs
JSON out of the middle of prose, which streaming cannot, so here both follow the streaming rule).

Calls are read left to right. When an object is not a call (bad JSON, no name) or something other
than ``;`` / whitespace follows a call, that point and everything after it is content, from the end
of the last good call on (so an output whose first object is bad is all content, the tag
included). Whitespace and ``;`` after the last call are dropped.

Streaming: an object that begins ``{"name": "...", "parameters": {`` (or ``"arguments"``) is
released as the call's name at that point, then its arguments as the model writes them
(``stream_args.py``); the rest of the object is dropped, and an object that breaks after its name
was sent stays a call with the arguments up to the break (the text up to where the brackets
close, or to the end of the output, is not content). Any other object is held until it closes
and judged whole. Held text is only the current object's beginning and the separators before it.
"""

from __future__ import annotations

import json

from serving.tool_parsers.base import ToolDelta, ToolParser, make_call
from serving.tool_parsers.scan import Scanner

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        # start: before the first non-whitespace; tag: after <|python_tag|>; object: inside one;
        # sep: after a call (wants ";"); next: after ";" (wants "{"); text: all content from here
        self._state = "start"
        self._hold = ""  # start: a beginning that may still be <|python_tag|>
        self._raw: list[str] = []  # held separators since the last good call (tag, ws, ";")
        self._scanner = Scanner()
        # object: the base's _mode / _parts / _stream / _index (ToolParser._stream_head)

    def _feed(self, delta: str, out: ToolDelta) -> None:
        while delta:
            state = self._state
            if state == "text":
                self._content(out, delta)
                return
            if state == "object":
                end = self._scanner.scan(delta)
                if self._stream_head(out, delta if end is None else delta[:end]):
                    self._raw = []  # a call: the separators before it are not content
                if end is None:
                    return
                delta = delta[end:]
                if self._mode == "args":  # the streamed call stands as sent
                    self._state, self._stream = "sep", None
                else:
                    body, self._parts = "".join(self._parts), []
                    self._close(out, body)
                continue
            if state == "start":
                text, self._hold = self._hold + delta, ""
                rest = text.lstrip()
                self._content(out, text[: len(text) - len(rest)])  # whitespace: held by the base
                if not rest:
                    return
                if rest.startswith(TAG):
                    self._raw.append(TAG)
                    self._state = "tag"
                    delta = rest[len(TAG):]
                elif TAG.startswith(rest):
                    self._hold = rest
                    return
                else:
                    self._state = "tag"
                    delta = rest
                continue
            # tag / sep / next: skip whitespace, then expect "{" (tag, next) or ";" (sep)
            rest = delta.lstrip()
            self._raw.append(delta[: len(delta) - len(rest)])
            if not rest:
                return
            if state == "sep" and rest[0] == ";":
                self._raw.append(";")
                self._state = "next"
                delta = rest[1:]
            elif state != "sep" and rest[0] == "{":
                self._state = "object"
                self._start_head()
                self._scanner = Scanner()
                delta = rest
            else:
                self._to_text(out, rest)
                return

    def _close(self, out: ToolDelta, body: str) -> None:
        try:
            call = make_call(json.loads(body))
        except ValueError:
            call = None
        if call is None:
            self._to_text(out, body)
        else:
            self._raw = []
            self._call(out, call)
            self._state = "sep"

    def _to_text(self, out: ToolDelta, rest: str) -> None:
        self._content(out, "".join(self._raw) + rest)
        self._raw = []
        self._state = "text"

    def _finish(self, out: ToolDelta) -> None:
        if self._state == "start":
            self._content(out, self._hold)
        elif self._state == "tag" or (self._state == "object" and self._mode != "args"):
            self._content(out, "".join(self._raw) + "".join(self._parts))
        # sep / next: only whitespace and ";" after the last call are held: dropped
