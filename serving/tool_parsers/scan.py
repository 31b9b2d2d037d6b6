"""Incremental bracket matching over JSON or Python text, one fragment at a time.

``Scanner.scan(piece)`` consumes the next fragment of a value that begins with an opening bracket
and returns the offset in ``piece`` just past the bracket that closes it, or ``None`` when the
value is still open (its state is kept, nothing is rescanned). Brackets inside strings do not
count; escapes may straddle fragments, and in Python mode so may the quotes of a ``'''`` or
``\"\"\"`` string. It only finds where the value ends: whether it is valid is for ``json.loads`` /
``ast.parse`` to say afterwards.
"""

from __future__ import annotations

import re

_JSON_OUT = re.compile(r'[\[\]{}"]')
_PY_OUT = re.compile(r"""[\[\](){}"'#]""")
_OPEN = frozenset("[({")
_STR_STOP = {q: re.compile("[\\\\" + q + "]") for q in "\"'"}


class Scanner:
    def __init__(self, python: bool = False):
        self.python = python
        self.depth = 0
        self.quote = ""  # inside a string: its quote ('"', "'", '\"\"\"' or "'''"); else ""
        self.escape = False  # the previous fragment ended with a backslash inside a string
        self.comment = False  # Python: inside a # comment (until the end of the line)
        self._carry = ""  # Python: trailing quote chars that may yet become a triple quote

    def scan(self, piece: str) -> int | None:
        text = self._carry + piece
        base = len(self._carry)  # offsets in text - base = offsets in piece
        self._carry = ""
        i, n = 0, len(text)
        out = _PY_OUT if self.python else _JSON_OUT
        while i < n:
            if self.escape:
                self.escape = False
                i += 1
                continue
            if self.comment:
                j = text.find("\n", i)
                if j < 0:
                    return None
                self.comment = False
                i = j + 1
                continue
            if self.quote:
                m = _STR_STOP[self.quote[0]].search(text, i)
                if m is None:
                    return None
                i = m.start()
                if text[i] == "\\":
                    if i + 1 < n:
                        i += 2
                    else:
                        self.escape = True
                        return None
                    continue
                if len(self.quote) == 1:
                    self.quote = ""
                    i += 1
                    continue
                if text.startswith(self.quote, i):
                    self.quote = ""
                    i += 3
                elif n - i < 3 and text[i:] == self.quote[: n - i]:
                    self._carry = text[i:]  # maybe the closing triple quote: wait for more
                    return None
                else:
                    i += 1
                continue
            m = out.search(text, i)
            if m is None:
                return None
            i = m.start()
            c = text[i]
            if c in _OPEN:
                self.depth += 1
                i += 1
            elif c in "])}":
                self.depth -= 1
                i += 1
                if self.depth <= 0:
                    return i - base
            elif c == "#":
                self.comment = True
                i += 1
            elif not self.python:
                self.quote = c
                i += 1
            elif text.startswith(c * 3, i):
                self.quote = c * 3
                i += 3
            elif n - i < 3 and text[i:] == c * (n - i):
                self._carry = text[i:]  # one or two quotes at the end: maybe a triple quote
                return None
            else:
                self.quote = c
                i += 1
        return None
