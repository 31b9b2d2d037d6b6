"""Streaming a tool call's arguments while the model writes them (pure Python, no jax).

Two pieces, shared by the parsers whose calls are JSON objects (hermes, llama3_json; mistral's
name-then-object calls use the streamer alone, their name being known before the object):

* :func:`head` decides, from the beginning of a call's object alone, whether it is a call whose
  arguments can be streamed: ``{"name": "<non-empty string>", "arguments": {`` (or
  ``"parameters"``; any whitespace). ``commit`` gives the name and where the arguments object
  starts; ``fallback`` says it can no longer be one (another key order, arguments as a string,
  no arguments, more than ``HEAD_LIMIT`` characters): the parser then holds the object whole and
  judges it at its end, as before; ``wait`` wants more text. The answer depends only on the text
  seen, never on how it was split, which keeps the parsers split-invariant.
* :class:`ArgsStreamer` reads the arguments object one character at a time and writes it back
  as ``json.dumps(obj, ensure_ascii=False)`` writes it (``", "`` and ``": "`` separators, escapes
  decoded, numbers re-printed), so the streamed fragments concatenate to the same text the whole
  parse answers. Strings stream character by character; a number or literal once it ends.

A call that goes wrong after its name was sent (the JSON breaks, the block ends early, the output
stops) cannot be taken back: the arguments end at the last character that was valid JSON (a
partial number, literal or surrogate escape is dropped) and the call stays a call, streamed or
not. vLLM's hermes parser streams the same truncated arguments but answers the same output
non-streamed as content without calls; here both answers are the call. Duplicate keys are
written as the model wrote them (``json.loads`` would keep the last value); a lone ``\\ud800``
escape stays escaped, the other characters as they are.
"""

from __future__ import annotations

import json
import re

HEAD_LIMIT = 1024  # characters of a call's object within which its name and arguments must begin

_STR = re.compile(r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"')
_STR_OPEN = re.compile(r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*(?:\\(?:u[0-9a-fA-F]{0,3})?)?')
_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUM = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_ESC = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_WS = " \t\n\r"
# the head, token by token: a literal (or one of several), or the name's JSON string
_HEAD = (("{",), ('"name"',), (":",), None, (",",), ('"arguments"', '"parameters"'), (":",), ("{",))


def head(text: str) -> tuple[str, str | None, int]:
    """``("commit", name, offset of the arguments' "{")``, ``("fallback", None, 0)`` or
    ``("wait", None, 0)`` for the beginning ``text`` of a call's object."""
    wait = ("fallback", None, 0) if len(text) >= HEAD_LIMIT else ("wait", None, 0)
    text = text[:HEAD_LIMIT]
    n, i, name = len(text), 0, ""
    for options in _HEAD:
        while i < n and text[i] in _WS:
            i += 1
        if i == n:
            return wait
        if options is None:  # the name
            m = _STR.match(text, i)
            if m is None:
                return wait if _STR_OPEN.fullmatch(text, i) else ("fallback", None, 0)
            name, i = json.loads(m.group()), m.end()
            continue
        rest = text[i:]
        hit = next((o for o in options if rest.startswith(o)), None)
        if hit is None:
            return wait if any(o.startswith(rest) for o in options) else ("fallback", None, 0)
        i += len(hit)
    return ("commit", name, i - 1) if name else ("fallback", None, 0)


def _char(c: str) -> str:
    """One decoded string character as json.dumps(ensure_ascii=False) writes it."""
    if c == '"':
        return '\\"'
    if c == "\\":
        return "\\\\"
    if c < " ":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}.get(c, f"\\u{ord(c):04x}")
    return c


class ArgsStreamer:
    """One JSON object, fed in pieces from its ``{``; ``feed`` returns the canonical text of what
    the piece completed. ``done`` once the object closed (later text is ignored), ``broken``
    once a character could not continue valid JSON (it and all later text are ignored)."""

    def __init__(self):
        self.stack: list[str] = []  # open containers: "{" or "["
        self.state = "value"  # value | first (after "[") | key0 (after "{") | key | colon | after | str | num | lit
        self.key = False  # in a string: it is an object key
        self.esc: str | None = None  # in a string: "" after a backslash, "uXX.." while reading \uXXXX
        self.high: int | None = None  # a high surrogate escape waiting for its low half
        self.tok = ""  # a number or literal being read
        self.done = False
        self.broken = False

    def feed(self, piece: str) -> str:
        out: list[str] = []
        i, n = 0, len(piece)
        while i < n and not (self.done or self.broken):
            if self.state == "str" and self.esc is None:  # a run of plain string characters at once
                m = _RUN.match(piece, i)
                if m is not None:
                    self._flush_high(out)
                    out.append(m.group())
                    i = m.end()
                    continue
            self._char(piece[i], out)
            i += 1
        return "".join(out)

    def _char(self, c: str, out: list[str]) -> None:
        st = self.state
        if st == "str":
            return self._in_string(c, out)
        if st == "num":
            if c in "0123456789+-.eE":
                self.tok += c
                return
            if _NUM.fullmatch(self.tok) is None or c not in ",]} \t\n\r":  # ended by what cannot follow it
                self.broken = True
                return
            out.append(json.dumps(json.loads(self.tok)))
            self.tok, self.state = "", "after"
            return self._char(c, out)
        if st == "lit":
            word = _LITERALS[self.tok[0]]
            if word[len(self.tok)] != c:
                self.broken = True
                return
            self.tok += c
            if self.tok == word:
                out.append(word)
                self.tok, self.state = "", "after"
            return
        if c in " \t\n\r":
            return
        if st in ("value", "first"):
            if st == "first" and c == "]":
                return self._close(c, out)
            if c in "{[":
                self.stack.append(c)
                out.append(c)
                self.state = "key0" if c == "{" else "first"
            elif c == '"':
                out.append(c)
                self.state, self.key = "str", False
            elif c in "-0123456789":
                self.tok, self.state = c, "num"
            elif c in _LITERALS:
                self.tok, self.state = c, "lit"
            else:
                self.broken = True
        elif st in ("key0", "key"):
            if st == "key0" and c == "}":
                return self._close(c, out)
            if c != '"':
                self.broken = True
                return
            out.append(c)
            self.state, self.key = "str", True
        elif st == "colon":
            if c != ":":
                self.broken = True
                return
            out.append(": ")
            self.state = "value"
        else:  # after a value
            if c == ",":
                out.append(", ")
                self.state = "key" if self.stack[-1] == "{" else "value"
            elif c in "}]":
                self._close(c, out)
            else:
                self.broken = True

    def _close(self, c: str, out: list[str]) -> None:
        if {"}": "{", "]": "["}[c] != self.stack[-1]:
            self.broken = True
            return
        self.stack.pop()
        out.append(c)
        self.state = "after"
        self.done = not self.stack

    def _in_string(self, c: str, out: list[str]) -> None:
        if self.esc is None:
            if c == "\\":
                self.esc = ""
            elif c == '"':
                self._flush_high(out)
                out.append(c)
                self.state = "colon" if self.key else "after"
            elif c < " ":
                self.broken = True  # a raw control character: json.loads refuses it too
            else:
                self._flush_high(out)
                out.append(c)
            return
        if self.esc == "":
            if c == "u":
                self.esc = "u"
                return
            if c not in _ESC:
                self.broken = True
                return
            self.esc = None
            self._flush_high(out)
            out.append(_char(_ESC[c]))
            return
        if c not in "0123456789abcdefABCDEF":
            self.broken = True
            return
        self.esc += c
        if len(self.esc) < 5:
            return
        code, self.esc = int(self.esc[1:], 16), None
        if 0xD800 <= code < 0xDC00:
            self._flush_high(out)
            self.high = code
        elif 0xDC00 <= code < 0xE000 and self.high is not None:
            out.append(chr(0x10000 + ((self.high - 0xD800) << 10) + (code - 0xDC00)))
            self.high = None
        else:
            self._flush_high(out)
            out.append(f"\\u{code:04x}" if 0xD800 <= code < 0xE000 else _char(chr(code)))

    def _flush_high(self, out: list[str]) -> None:
        if self.high is not None:
            out.append(f"\\u{self.high:04x}")
            self.high = None
