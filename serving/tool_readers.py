"""Tool-call readers (no jax): one per tool_choice mode, each reading one choice's text as it
grows and returning ``(content, [(call index, name on the call's first delta, arguments
fragment)])`` from ``feed(text)`` and ``finish()``. serving/openai_tools.py turns those into
OpenAI tool-call deltas; the same reader serves the streamed and the whole answer.
"""

from __future__ import annotations

import json
from typing import Any


class NamedReader:
    """tool_choice named: the whole output is the one call's arguments."""

    def __init__(self, name: str):
        self.name = name
        self.opened = False

    def feed(self, text: str) -> tuple[str, list]:
        if not self.opened:
            self.opened = True
            return "", [(0, self.name, text)]
        return "", [(0, None, text)] if text else []

    def finish(self) -> tuple[str, list]:
        return self.feed("") if not self.opened else ("", [])


class _Call:
    __slots__ = ("name", "start", "end", "upto", "sent", "opened")

    def __init__(self):
        self.name: str | None = None
        self.start: int | None = None  # where "parameters"' value starts in the text
        self.end: int | None = None  # where it ends, once it has
        self.upto = 0  # how far a container value has been read
        self.sent = 0  # characters of it already sent
        self.opened = False


class ArrayReader:
    """tool_choice required: reads ``[{"name": ..., "parameters": ...}, ...]`` as it grows, one
    character at a time (JSON strings, depth, keys at the objects' level), so a call's arguments
    stream out while its parameters object is still being written."""

    def __init__(self):
        self.buf = ""
        self.pos = 0
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.str_start = 0
        self.calls: list[_Call] = []
        self.key: str | None = None  # depth 2: the key just read
        self.vkey: str | None = None  # depth 2: the key whose value is being read (after ':')
        self.vstart: int | None = None

    def feed(self, text: str) -> tuple[str, list]:
        self.buf += text
        self._scan()
        return "", self._emit()

    def finish(self) -> tuple[str, list]:
        return "", self._emit()

    def _scan(self) -> None:
        buf = self.buf
        for i in range(self.pos, len(buf)):
            c = buf[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 2:
                        if self.vkey is None:
                            self.key = _loads(buf[self.str_start:i + 1])
                        elif self.vstart == self.str_start:
                            self._value_end(i + 1)
                continue
            at_value = self.depth == 2 and self.vkey is not None and self.vstart is None
            if c == '"':
                self.in_str, self.str_start = True, i
                if at_value:
                    self.vstart = i
            elif c in "{[":
                if at_value:
                    self.vstart = i
                self.depth += 1
                if self.depth == 2:
                    self.calls.append(_Call())
                    self.key = self.vkey = self.vstart = None
            elif c in "}]":
                if self.depth == 2 and c == "}":
                    self._scalar_end(i)
                self.depth -= 1
                if self.depth == 2 and self.vkey is not None:  # a container value closed
                    self._value_end(i + 1)
            elif self.depth == 2 and c == ":":
                self.vkey, self.vstart = self.key, None
            elif self.depth == 2 and c == ",":
                self._scalar_end(i)
                self.key = self.vkey = self.vstart = None
            elif at_value and not c.isspace():
                self.vstart = i
        self.pos = len(buf)
        if self.depth > 2 and self.vkey == "parameters" and self.vstart is not None and self.calls:
            call = self.calls[-1]
            call.start, call.upto = self.vstart, len(buf)

    def _scalar_end(self, i: int) -> None:
        if self.vkey is not None and self.vstart is not None:
            end = i
            while end > self.vstart and self.buf[end - 1].isspace():
                end -= 1
            self._value_end(end)

    def _value_end(self, end: int) -> None:
        call = self.calls[-1]
        text = self.buf[self.vstart:end]
        if self.vkey == "name":
            name = _loads(text)
            call.name = name if isinstance(name, str) else None
        elif self.vkey == "parameters":
            call.start, call.end = self.vstart, end
        self.vkey = self.vstart = None

    def _emit(self) -> list:
        out = []
        for k, call in enumerate(self.calls):
            if call.name is None:
                continue
            frag = ""
            if call.start is not None:
                stop = call.end if call.end is not None else call.upto
                frag = self.buf[call.start + call.sent:stop]
                call.sent += len(frag)
            if not call.opened:
                call.opened = True
                out.append((k, call.name, frag))
            elif frag:
                out.append((k, None, frag))
        return out


class ParserReader:
    """tool_choice auto: a ``serving.tool_parsers`` parser's content and call deltas."""

    def __init__(self, name: str, tools: list):
        from serving.tool_parsers import get_parser

        self.parser = get_parser(name)([{"type": "function", "function": t.model_dump(exclude_none=True)}
                                        for t in tools])

    def feed(self, text: str) -> tuple[str, list]:
        return self._calls(self.parser.feed(text))

    def finish(self) -> tuple[str, list]:
        return self._calls(self.parser.finish())

    @staticmethod
    def _calls(d: Any) -> tuple[str, list]:
        return d.content or "", [(c.index, c.name, c.arguments or "") for c in d.calls]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
