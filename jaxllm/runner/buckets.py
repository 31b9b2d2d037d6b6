"""Declared shape buckets: every step pads to one of these, all compiled at warm-up.

Decode-only steps (one new token per sequence) use T == S from `decode` sizes; any other step
uses T from `mixed` token sizes with S = max_num_seqs.
"""
from __future__ import annotations

import dataclasses


def _powers(lo: int, hi: int, factor: int) -> list[int]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= factor
    out.append(hi)
    return sorted(set(out))


@dataclasses.dataclass(frozen=True)
class Buckets:
    decode: tuple[int, ...]  # sequence counts for decode-only steps (T == S)
    mixed: tuple[int, ...]  # token counts for prefill/mixed steps (S = max_num_seqs)
    max_num_seqs: int

    @staticmethod
    def make(max_num_seqs: int, max_num_batched_tokens: int) -> "Buckets":
        decode = _powers(min(8, max_num_seqs), max_num_seqs, 2)
        mixed = _powers(min(64, max_num_batched_tokens), max_num_batched_tokens, 4)
        return Buckets(tuple(decode), tuple(mixed), max_num_seqs)

    def pick(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int, bool]:
        """→ (padded tokens, padded seqs, decode_only)."""
        if decode_only:
            s = next(b for b in self.decode if b >= num_seqs)
            return s, s, True
        t = next(b for b in self.mixed if b >= num_tokens)
        return t, self.max_num_seqs, False

    def all(self) -> list[tuple[int, int, bool]]:
        return [(s, s, True) for s in self.decode] + [(t, self.max_num_seqs, False) for t in self.mixed]

    def describe(self) -> str:
        return (f"decode T=S in {list(self.decode)}; mixed T in {list(self.mixed)} with S={self.max_num_seqs}")
