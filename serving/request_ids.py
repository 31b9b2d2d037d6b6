"""Client-chosen request ids on the HTTP door (vLLM's ``X-Request-Id`` header and body
``request_id``; no jax).

vLLM's rule (``OpenAIServing._base_request_id``): the ``X-Request-Id`` header wins, then the
body's ``request_id`` (completions and chat), else a random id; the answer's ``id`` is
``cmpl-<id>`` / ``chatcmpl-<id>`` (``resp_<id>`` on /v1/responses). The header comes back on
the response (vLLM's ``--enable-request-id-headers``, always on here).

The client's id is what the client sees; the engine never runs it bare. Each engine request is
``<shown id>-<8 random hex>-<prompt>``, so two clients (or one client's retry) sending the same id
at once are two distinct engine requests, never a collision, and an abort (client gone) ends only
its own. A value must be 1 to ``--max-request-id-len`` visible ASCII characters (no spaces or
control characters: it is written into logs and header lines).
"""

from __future__ import annotations

import re
import uuid

HEADER = "X-Request-Id"
_VISIBLE = re.compile(r"[!-~]+")  # 0x21..0x7e


def client_request_id(header: str | None, body_value: str | None, max_len: int) -> str | None:
    """The client's request id (header first, as vLLM), checked; None when the client set none.
    ValueError: one line naming the field, the value and the limit."""
    field, value = (HEADER, header) if header is not None else ("request_id", body_value)
    if value is None:
        return None
    if len(value) > max_len:
        raise ValueError(f"{field} of length {len(value)} is invalid: must be at most {max_len} characters "
                         f"(--max-request-id-len)")
    if not _VISIBLE.fullmatch(value):
        bad = "it is empty" if not value else f"{_first_bad(value)!r} is not a visible ASCII character"
        raise ValueError(f"{field}={value[:64]!r} is invalid: {bad} (allowed: '!' to '~', no spaces)")
    return value


def _first_bad(value: str) -> str:
    return next(c for c in value if not _VISIBLE.fullmatch(c))


def engine_prefix(shown_id: str, client_chosen: bool) -> str:
    """The engine-side prefix of one answer's requests: ``shown_id`` itself when the server chose it
    (a fresh uuid), else ``shown_id`` + 8 random hex so equal client ids never share an engine id."""
    return f"{shown_id}-{uuid.uuid4().hex[:8]}" if client_chosen else shown_id
