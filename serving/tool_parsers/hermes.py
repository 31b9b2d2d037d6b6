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

Streaming: text that could be the start of ``<tool_call>`` is held back until it cannot be; a
block is held until ``</tool_call>`` (or the end) and then released as one call with its whole
arguments, because a block can only be judged a call once its JSON is complete. Each fragment is
looked at once (the end-tag search overlaps the previous fragment by ``len(tag) - 1`` chars).
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
        self._hold = ""  # outside a block: an end of text that may begin START
        self._parts: list[str] = []  # inside a block: the body so far
        self._tail = ""  # inside a block: the body's last len(END) - 1 chars

    def _feed(self, delta: str, out: ToolDelta) -> None:
        while delta:
            if not self._in_block:
                text = self._hold + delta
                i = text.find(START)
                if i < 0:
                    k = partial_suffix(text, START)
                    self._content(out, text[: len(text) - k])
                    self._hold = text[len(text) - k:]
                    return
                self._content(out, text[:i])
                self._hold = ""
                self._in_block, self._parts, self._tail = True, [], ""
                delta = text[i + len(START):]
            else:
                text = self._tail + delta
                i = text.find(END)
                if i < 0:
                    self._parts.append(delta)
                    self._tail = text[-(len(END) - 1):]
                    return
                so_far = "".join(self._parts)
                body = so_far[: len(so_far) - len(self._tail)] + text[:i]
                self._in_block = False
                self._close(out, body, END)
                delta = text[i + len(END):]

    def _close(self, out: ToolDelta, body: str, end: str) -> None:
        call = parse_block(body)
        if call is None:
            self._content(out, START + body + end)
        else:
            self._call(out, call)

    def _finish(self, out: ToolDelta) -> None:
        if self._in_block:
            self._in_block = False
            self._close(out, "".join(self._parts), "")
        else:
            self._content(out, self._hold)
            self._hold = ""
