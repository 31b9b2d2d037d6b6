"""``hermes``: Hermes 2 Pro / Qwen2.5 / Qwen3 / SmolLM3 tool calls.

Format (several blocks per output; text before, between and after them is content)::

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}
    </tool_call>

A block is one JSON object with a string ``name`` and an ``arguments`` object (``parameters`` is
accepted too; a JSON string holding an object is decoded; absent means ``{}``). A block whose JSON
does not parse or is not such an object is content, tags included (vLLM returns the text as
content on a bad call too). A final block without ``</tool_call>`` (the model stopped right after
the JSON) is still a call when its JSON is whole, like vLLM's ``<tool_call>(.*)`` fallback.

Streaming: text that could be the start of ``<tool_call>`` (or, inside a block, of
``</tool_call>``) is held back until it cannot be. A block that begins
``{"name": "...", "arguments": {`` is released as the call's name at that point, then its
arguments as the model writes them (``stream_args.py``: the same text the whole parse answers);
whatever follows the arguments object in the block is dropped, and a block that breaks after its
name was sent stays a call with the arguments up to the break (vLLM streams the same; its
non-streamed answer is then content). Any other block (keys in another order, arguments as a JSON
string, none) is held until ``</tool_call>`` (or the end) and judged whole, as above. Each
fragment is looked at once.
"""

from __future__ import annotations

import json

from serving.tool_parsers.base import ToolCall, ToolDelta, ToolParser, make_call, partial_suffix

START = "<tool_call>"
END = "</tool_call>"


def parse_block(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return make_call(obj)


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self._in_block = False
        self._hold = ""  # an end of text that may begin START (outside a block) or END (inside)
        # inside a block: the base's _mode / _parts / _stream / _index (ToolParser._stream_head)

    def _feed(self, delta: str, out: ToolDelta) -> None:
        while delta:
            text = self._hold + delta
            self._hold = ""
            mark = END if self._in_block else START
            i = text.find(mark)
            if i < 0:
                k = partial_suffix(text, mark) if "<" in text[1 - len(mark):] else 0
                self._hold = text[len(text) - k:]
                if self._in_block:
                    self._body(out, text[: len(text) - k])
                else:
                    self._content(out, text[: len(text) - k])
                return
            delta = text[i + len(mark):]
            if self._in_block:
                self._body(out, text[:i])
                self._end_block(out, END)
            else:
                self._content(out, text[:i])
                self._in_block = True
                self._start_head()

    def _body(self, out: ToolDelta, piece: str) -> None:
        """The next characters of the block's body (none of them part of END)."""
        self._stream_head(out, piece)

    def _end_block(self, out: ToolDelta, end: str) -> None:
        self._in_block = False
        if self._mode != "args":  # a streamed call stands as sent
            self._close(out, "".join(self._parts), end)
        self._parts, self._stream = [], None

    def _close(self, out: ToolDelta, body: str, end: str) -> None:
        call = parse_block(body)
        if call is None:
            self._content(out, START + body + end)
        else:
            self._call(out, call)

    def _finish(self, out: ToolDelta) -> None:
        hold, self._hold = self._hold, ""
        if self._in_block:
            self._body(out, hold)  # not END after all
            self._end_block(out, "")
        else:
            self._content(out, hold)
