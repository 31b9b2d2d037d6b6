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

A parameter's value is the raw text between ``<parameter=NAME>`` and its closing tag, one leading
and one trailing newline trimmed, converted by the parameter's type in the tool's JSON schema
(``param_types.py``). The arguments are the parameters in order, as a JSON object (a repeated name
is written twice; JSON readers keep the last, as vLLM's dict does). Text between the tags of a call
(the newlines) is not content. One block may hold several functions; a ``<function=`` without
``<tool_call>`` around it is a call too (vLLM's fallback), and so is a function or block whose
closing tags never came: the call ends with the output, with the parameters read so far, a value
cut off included (as vLLM's whole-output parse). A name that is not in ``tools`` stays a call.

Where a value ends (current vLLM's look-ahead, so that a file written as one value may contain the
tags): a tag inside a value closes it only when what follows it, after optional whitespace, says
it is structural; otherwise the tag is text of the value.

* ``</parameter>`` ends the value when followed by ``<parameter=``, ``</function>``,
  ``</tool_call>`` or the end of the output;
* ``</function>`` (a missing ``</parameter>``) ends the value and the function when followed by
  ``</tool_call>`` or the end of the output;
* ``</tool_call>`` ends value, function and block when followed by ``<tool_call>`` or the end;
* ``<parameter=`` at the start of a line of the value (or right after ``<parameter=NAME>``) ends
  the value and opens the next parameter (a missing ``</parameter>``); elsewhere it is text.

vLLM decides with the whole output in hand; where that needs more than the next tag, this parser
answers from the bounded look-ahead above and its whole parse answers the same (its streaming
must): vLLM also checks that the name after ``</parameter>`` + ``<parameter=`` is in the schema,
pairs a line-start ``<parameter=`` inside a value with a later ``</parameter>`` as literal nesting,
and reads a line-start ``<parameter=`` as a missing ``</parameter>`` only when no structural
``</parameter>`` comes later. Between parameters, ``<parameter=`` need not start a line.

Malformed: a function name (or parameter name) is the text up to ``>``; when a ``<`` or a newline
comes first, or the name is empty, a function's opening is content, from its ``<tool_call>`` (or
``<function=``) to there, and reading goes on as plain text; a parameter with such a name is
dropped. A ``<tool_call>`` block with no function in it is content, tags included.

Streaming: text that may begin a tag is held back until it cannot, and a whole tag inside a value
(with the whitespace after it) until the look-ahead decides. A call's name goes out with ``{``
when ``<function=NAME>`` closes, then each parameter as ``"name": value`` (with ``, `` before all
but the first). A value that converts to a string streams as it comes: ``"name": "`` as soon as
it is known to be a string, its characters JSON-escaped as they arrive (a trailing newline held
back, since it is trimmed if the value ends there), and ``"`` when it ends. A string-typed
parameter is known at once; one that may be ``null`` once its text can no longer be ``null`` /
``None``; an untyped one (no schema, a parameter the schema does not list, no ``type``) once its
text can no longer be JSON. Any other value goes out whole when it ends (its conversion needs all
of it). ``}`` when the function ends: the fragments join to the whole parse's arguments, and
nothing is sent that a later character could take back. Each fragment is looked at once, but
for a held tag and the whitespace after it.
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
    "value": (PARAM_END, PARAM, FUNC_END, CALL_END),  # a parameter's value: candidates
}
# in a value: what must follow a tag (after whitespace) for it to be structural; or the end
FOLLOW = {PARAM_END: (PARAM, FUNC_END, CALL_END), FUNC_END: (CALL_END,), CALL_END: (CALL,)}
_FOLLOW_LEN = max(len(t) for ts in FOLLOW.values() for t in ts)
_FIND = {state: re.compile("|".join(map(re.escape, marks))) for state, marks in MARKS.items()}
_NAME_STOP = re.compile(r"[<>\n]")
_SPACE = re.compile(r"\s*")


def held(text: str, marks: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that may still become one of ``marks``."""
    if "<" not in text[-max(len(m) for m in marks):]:
        return 0
    return max(partial_suffix(text, m) for m in marks)


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self._state = "text"
        self._hold = ""  # an end of text that may begin one of the state's MARKS, or a tag in look-ahead
        self._in_block = False  # inside <tool_call> (else a bare <function=, or plain text)
        self._block_calls = 0  # calls opened in the current block
        self._raw: list[str] = []  # text / block / name: a block's or function's opening, not content yet
        self._label: list[str] = []  # name / pname: the name so far
        self._props: dict | None = None  # the open call's schema properties
        self._count = 0  # the open call's parameters sent
        # value: its parameter's name and schema; how it goes out: "stream" (a string, sent as it
        # comes), "wait" (may turn out a string) or "whole"; its text so far (wait / whole); the
        # leading newline not looked at yet; a held trailing newline (stream); its last character
        self._pname, self._schema, self._vmode = "", None, "whole"
        self._value: list[str] = []
        self._fresh, self._nl, self._last = True, "", ""

    def _feed(self, delta: str, out: ToolDelta) -> None:
        self._scan(self._hold + delta, out, eof=False)

    def _scan(self, text: str, out: ToolDelta, eof: bool) -> None:
        """Read ``text``; at ``eof`` nothing is held back (the output ended)."""
        self._hold = ""
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
                k = 0 if eof else held(rest, MARKS[state])
                self._hold = rest[len(rest) - k:]
                self._take(out, rest[: len(rest) - k])
                return
            if state == "value":
                real = self._structural(text, i, m, eof)
                if real is None:  # the look-ahead needs more text: hold from the tag on
                    self._take(out, text[i: m.start()])
                    self._hold = text[m.start():]
                    return
                if not real:  # text of the value
                    self._take(out, text[i: m.end()])
                    i = m.end()
                    continue
            self._take(out, text[i: m.start()])
            i = m.end()
            self._mark(out, m.group())

    def _structural(self, text: str, i: int, m: re.Match, eof: bool) -> bool | None:
        """Whether the tag ``m`` met in a value (read from ``i``) closes it; None: undecided yet."""
        tag = m.group()
        if tag == PARAM:  # at the start of a line of the value
            prev = text[m.start() - 1] if m.start() > i else self._last
            return prev in ("", "\n")
        at = _SPACE.match(text, m.end()).end()
        nxt = text[at: at + _FOLLOW_LEN]
        if not nxt:
            return True if eof else None
        if nxt.startswith(FOLLOW[tag]):
            return True
        if not eof and any(f.startswith(nxt) for f in FOLLOW[tag]):
            return None
        return False

    def _take(self, out: ToolDelta, piece: str) -> None:
        """Text of the current state that is no tag."""
        if not piece:
            return
        if self._state == "text":
            self._content(out, piece)
        elif self._state == "block":
            self._raw.append(piece)
        elif self._state == "value":
            self._value_text(out, piece)
        # params: the newlines (or anything else) between parameters are dropped

    def _mark(self, out: ToolDelta, mark: str) -> None:
        """A whole tag of the current state's MARKS was read (in a value: a structural one)."""
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
                self._open_value(out, name)
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

    # -- a value ---------------------------------------------------------------------------------
    def _open_value(self, out: ToolDelta, name: str) -> None:
        self._state, self._pname, self._value = "value", name, []
        self._schema = (self._props or {}).get(name)
        self._fresh, self._nl, self._last = True, "", ""
        self._vmode = param_types.string_mode(self._schema)
        if self._vmode == "stream":
            self._args(out, self._index, self._key() + '"')

    def _key(self) -> str:
        return f"{', ' if self._count else ''}{param_types.dump(self._pname)}: "

    def _value_text(self, out: ToolDelta, piece: str) -> None:
        self._last = piece[-1]
        if self._fresh:  # the value's first character: a newline there is trimmed
            self._fresh = False
            piece = piece[1:] if piece[0] == "\n" else piece
        if self._vmode == "stream":
            self._send(out, piece)
            return
        self._value.append(piece)
        if self._vmode == "wait":
            head = "".join(self._value)
            verdict = param_types.stays_text(head[:-1] if head.endswith("\n") else head, self._schema)
            if verdict is not None:
                self._vmode, self._value = ("stream", []) if verdict else ("whole", self._value)
                if verdict:
                    self._args(out, self._index, self._key() + '"')
                    self._send(out, head)

    def _send(self, out: ToolDelta, piece: str) -> None:
        """The next characters of a streamed string value, but a trailing newline (held)."""
        piece = self._nl + piece
        self._nl = "\n" if piece.endswith("\n") else ""
        self._args(out, self._index, param_types.string_chars(piece[: len(piece) - len(self._nl)]))

    def _end_value(self, out: ToolDelta) -> None:
        if self._vmode == "stream":  # the held trailing newline is the one trimmed
            self._args(out, self._index, '"')
        else:
            raw = "".join(self._value)
            value: Any = param_types.convert(raw[:-1] if raw.endswith("\n") else raw, self._schema)
            text = f'"{param_types.string_chars(value)}"' if isinstance(value, str) else param_types.dump(value)
            self._args(out, self._index, self._key() + text)
        self._count += 1
        self._value, self._nl = [], ""

    def _finish(self, out: ToolDelta) -> None:
        self._scan(self._hold, out, eof=True)  # held text and tags in look-ahead, decided
        state = self._state
        if state == "block":
            if not self._block_calls:
                self._content(out, "".join(self._raw))
        elif state == "name":
            self._content(out, "".join(self._raw) + "".join(self._label))
        elif state != "text":  # params, pname (dropped), value (cut off: kept): the call ends here
            if state == "value":
                self._end_value(out)
            self._args(out, self._index, "}")
        self._raw, self._label, self._value = [], [], []
