"""A readable logprobs table for the CLIs (``python -m jaxllm.generate --logprobs K`` and
``python -m serving.client --logprobs K``); host only, no jax.

One row per token: its position, id and text, its logprob and rank, then the top-K alternatives
in rank order::

      pos  token                      logprob   rank  top-2
        0  ' Paris' (7042)            -0.2580      1  #1 ' Paris' -0.2580  #2 ' the' -2.7400
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple


class Alternative(NamedTuple):
    token_id: int
    text: str | None
    logprob: float


class TokenRow(NamedTuple):
    position: int
    token_id: int
    text: str | None  # None: not detokenized
    logprob: float | None  # None: not known (nothing predicts the first prompt token)
    rank: int | str | None  # an int, or a bound such as ">3" where only that is known
    top: Sequence[Alternative]  # best first


def _token(token_id: int, text: str | None) -> str:
    return f"{text!r} ({token_id})" if text else f"({token_id})"


def _alt(rank: int, a: Alternative) -> str:
    shown = repr(a.text) if a.text else f"({a.token_id})"  # the id where there is no text
    return f"#{rank} {shown} {a.logprob:.4f}"


def format_table(rows: Iterable[TokenRow], k: int, title: str) -> str:
    lines = [title, f"  {'pos':>5}  {'token':<26} {'logprob':>9} {'rank':>6}  top-{k}"]
    for r in rows:
        lp = f"{r.logprob:.4f}" if r.logprob is not None else "-"
        rank = str(r.rank) if r.rank is not None else "-"
        alts = "  ".join(_alt(i + 1, a) for i, a in enumerate(r.top[:k]))
        lines.append(f"  {r.position:>5}  {_token(r.token_id, r.text):<26} {lp:>9} {rank:>6}  {alts}".rstrip())
    return "\n".join(lines)


def rows_from_logprobs(token_ids: Sequence[int], entries: Sequence, k: int, start: int = 0) -> list[TokenRow]:
    """Rows from jaxllm outputs: ``token_ids[i]`` and ``entries[i]`` (a ``{token_id: Logprob}`` dict,
    or None for the first prompt token). The top-K are the entries of rank 1..K."""
    rows = []
    for i, (tid, entry) in enumerate(zip(token_ids, entries)):
        own = entry.get(tid) if entry else None
        top = sorted(((lp.rank, t, lp) for t, lp in (entry or {}).items()
                      if lp.rank is not None and lp.rank <= k), key=lambda x: (x[0], x[1]))
        rows.append(TokenRow(start + i, tid, own.decoded_token if own else None,
                             own.logprob if own else None, own.rank if own else None,
                             [Alternative(t, lp.decoded_token, lp.logprob) for _, t, lp in top]))
    return rows
