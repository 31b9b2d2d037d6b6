"""Client-chosen request ids on the HTTP door (vLLM's ``X-Request-Id`` header and body
``request_id``; no jax).

vLLM's rule (``OpenAIServing._base_request_id``): the ``X-Request-Id`` header wins, then the
body's ``request_id`` (completions, chat, embeddings), else a random id; the answer's ``id`` is
``cmpl-<id>`` / ``chatcmpl-<id>`` / ``embd-<id>`` (``resp_<id>`` on /v1/responses). A client's
``X-Request-Id`` always comes back as a response header; with ``--enable-request-id-headers``
(vLLM's flag) every answer carries one: the client's header, else the body's ``request_id``, else
the id the server drew for the request (``RequestIdSlot``), which then also names the answer.

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


class RequestIdSlot:
    """One HTTP request's id for its ``X-Request-Id`` response header, shared by the middleware
    (which sends the header when the response starts) and the handler (which names the answer).
    ``value`` starts as the client's header, else (``--enable-request-id-headers``) a fresh uuid
    hex, else None (no header); a handler that takes the body's ``request_id`` puts it here."""

    SCOPE_KEY = "jaxllm.request_id"

    def __init__(self, value: str | None):
        self.value = value

    @classmethod
    def of(cls, scope: dict) -> "RequestIdSlot | None":
        return scope.get(cls.SCOPE_KEY)


def fresh_request_id() -> str:
    return uuid.uuid4().hex


def _first_bad(value: str) -> str:
    return next(c for c in value if not _VISIBLE.fullmatch(c))


def engine_prefix(shown_id: str, client_chosen: bool) -> str:
    """The engine-side prefix of one answer's requests: ``shown_id`` itself when the server chose it
    (a fresh uuid), else ``shown_id`` + 8 random hex so equal client ids never share an engine id."""
    return f"{shown_id}-{uuid.uuid4().hex[:8]}" if client_chosen else shown_id
