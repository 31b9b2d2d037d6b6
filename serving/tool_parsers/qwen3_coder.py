"""``qwen3_coder`` (also ``qwen3_xml``): Qwen3-Coder's XML-like tool calls.

Format (several blocks per output; text before, between and after them is content)::

    Let me check.
    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A parameter's value is the raw text between ``<parameter=NAME>`` and ``</parameter>``, one leading
and one trailing newline trimmed, converted by the parameter's type in the tool's JSON schema
(``param_types.py``). The value ends at the first ``</parameter>``, ``<parameter=``,
``</function>`` or ``</tool_call>`` (as vLLM's parse: a value cannot contain these four). The
arguments are the parameters in order, as a JSON object (a repeated name is written twice; JSON
readers keep the last, as vLLM's dict does). Text between the tags of a call (the newlines) is not
content. One block may hold several functions; a ``<function=`` without ``<tool_call>`` around it
is a call too (vLLM's fallback), and so is a function or block whose closing tags never came: the
call ends with the output, with the parameters read so far, a value cut off included (as vLLM's
whole-output parse). A name that is not in ``tools`` stays a call.

Malformed: a function name (or parameter name) is the text up to ``>``; when a ``<`` or a newline
comes first, or the name is empty, a function's opening is content, from its ``<tool_call>`` (or
``<function=``) to there, and reading goes on as plain text; a parameter with such a name is
dropped. A ``<tool_call>`` block with no function in it is content, tags included.

Streaming: text that may begin a tag is held back until it cannot. A call's name goes out with
``{`` when ``<function=NAME>`` closes, then each parameter as ``"name": value`` (with ``, `` before
all but the first) when its value ends, and ``}`` when the function ends: the fragments join to
the whole parse's arguments, and nothing is sent that a later character could take back. Each
fragment is looked at once.
"""

from __future__ import annotations

import re
from typing import Any

from serving.tool_parsers import param_types
from serving.tool_parsers.base import ToolDelta, ToolParser, partial_suffix

CALL, CALL_END = "<tool_call>", "</tool_call>"
FUNC, FUNC_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"

# the tags each state looks for; "name" / "pname" read a name up to ">" instead
MARKS = {
    "text": (CALL, FUNC),  # content
    "block": (FUNC, CALL_END),  # inside <tool_call>, outside a function
    "params": (PARAM, FUNC_END, CALL_END, FUNC),  # inside a function, between parameters
    "value": (PARAM_END, PARAM, FUNC_END, CALL_END),  # a parameter's value
}
_FIND = {state: re.compile("|".join(map(re.escape, marks))) for state, marks in MARKS.items()}
_NAME_STOP = re.compile(r"[<>\n]")


def held(text: str, marks: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that may still become one of ``marks``."""
    if "<" not in text[-max(len(m) for m in marks):]:
        return 0
    return max(partial_suffix(text, m) for m in marks)


def trim(value: str) -> str:
    """One leading and one trailing newline off (the template writes the value on its own lines)."""
    if value.startswith("\n"):
        value = value[1:]
    return value[:-1] if value.endswith("\n") else value


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self._state = "text"
        self._hold = ""  # an end of text that may begin one of the state's MARKS
        self._in_block = False  # inside <tool_call> (else a bare <function=, or plain text)
        self._block_calls = 0  # calls opened in the current block
        self._raw: list[str] = []  # text / block / name: a block's or function's opening, not content yet
        self._label: list[str] = []  # name / pname: the name so far
        self._props: dict | None = None  # the open call's schema properties
        self._count = 0  # the open call's parameters sent
        self._pname = ""  # value: its parameter's name
        self._value: list[str] = []  # value: its text so far

    def _feed(self, delta: str, out: ToolDelta) -> None:
        text, self._hold = self._hold + delta, ""
        i = 0  # read up to here (positions, not slices: a whole output in one piece stays linear)
        while i < len(text):
            state = self._state
            if state in ("name", "pname"):
                m = _NAME_STOP.search(text, i)
                if m is None:
                    self._label.append(text[i:])
                    return
                self._label.append(text[i: m.start()])
                i = self._end_label(out, text, m.start())
                continue
            m = _FIND[state].search(text, i)  # the earliest tag (none is a prefix of another)
            if m is None:
                rest = text[i:]
                k = held(rest, MARKS[state])
                self._hold = rest[len(rest) - k:]
                self._take(out, rest[: len(rest) - k])
                return
            self._take(out, text[i: m.start()])
            i = m.end()
            self._mark(out, m.group())

    def _take(self, out: ToolDelta, piece: str) -> None:
        """Text of the current state that is no tag."""
        if not piece:
            return
        if self._state == "text":
            self._content(out, piece)
        elif self._state == "block":
            self._raw.append(piece)
        elif self._state == "value":
            self._value.append(piece)
        # params: the newlines (or anything else) between parameters are dropped

    def _mark(self, out: ToolDelta, mark: str) -> None:
        """A whole tag of the current state's MARKS was read."""
        state = self._state
        if state == "value":
            self._end_value(out)
            state = self._state = "params"
            if mark == PARAM_END:
                return
        if state == "text":
            self._raw, self._in_block, self._block_calls = [mark], mark == CALL, 0
            self._state = "block" if mark == CALL else "name"
        elif state == "block":
            if mark == FUNC:
                self._raw.append(FUNC)
                self._state = "name"
            else:  # </tool_call>: a block with no call is content
                if not self._block_calls:
                    self._content(out, "".join(self._raw) + CALL_END)
                self._raw, self._state, self._in_block = [], "text", False
        elif mark == PARAM:
            self._state = "pname"
        else:  # </function>, </tool_call> or a next <function= ends the open call
            self._args(out, self._index, "}")
            if mark == FUNC:
                self._raw, self._state = [FUNC], "name"
            elif mark == FUNC_END and self._in_block:
                self._raw, self._state = [], "block"
            else:
                self._raw, self._state, self._in_block = [], "text", False

    def _end_label(self, out: ToolDelta, text: str, at: int) -> int:
        """A function's or parameter's name met ``<``, ``>`` or a newline at ``text[at]``;
        returns where reading goes on (past a ``>``, else at that character)."""
        label = "".join(self._label)
        self._label = []
        name = label.strip()
        ok = text[at] == ">" and name
        rest = at + 1 if text[at] == ">" else at
        if self._state == "pname":
            if ok:
                self._pname, self._value, self._state = name, [], "value"
            else:
                self._state = "params"  # a broken parameter is dropped
            return rest
        if ok:
            self._raw, self._state = [], "params"
            self._index = self._open_call(out, name)
            self._args(out, self._index, "{")
            self._block_calls += 1
            self._props, self._count = param_types.properties(self.tools, name), 0
        else:  # a broken opening is content, and reading goes on as plain text
            self._content(out, "".join(self._raw) + label + text[at:rest])
            self._raw, self._state, self._in_block = [], "text", False
        return rest

    def _end_value(self, out: ToolDelta) -> None:
        props = self._props or {}
        value: Any = param_types.convert(trim("".join(self._value)), props.get(self._pname))
        sep = ", " if self._count else ""
        self._args(out, self._index, f"{sep}{param_types.dump(self._pname)}: {param_types.dump(value)}")
        self._count += 1
        self._value = []

    def _finish(self, out: ToolDelta) -> None:
        hold, self._hold = self._hold, ""
        state = self._state
        if state == "text":
            self._content(out, hold)
        elif state == "block":
            if not self._block_calls:
                self._content(out, "".join(self._raw) + hold)
        elif state == "name":
            self._content(out, "".join(self._raw) + "".join(self._label))
        else:  # params, pname (dropped), value (cut off: kept): the call ends here
            if state == "value":
                self._value.append(hold)
                self._end_value(out)
            self._args(out, self._index, "}")
        self._raw, self._label, self._value = [], [], []
