"""Declared shape buckets: every step pads to one of these, all compiled at warm-up.

Decode-only steps (one new token per sequence) use T == S from `decode` sizes; any other step
uses T from `mixed` token sizes with S = `mixed_seqs`: max_num_seqs, or with speculative decoding
the most sampling rows a step can have (a sequence with d drafts samples d + 1 rows:
min(max_num_seqs * (1 + K), max_num_batched_tokens)). Draft steps are never decode-only.
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
    mixed_seqs: int = 0  # S of mixed steps (0: max_num_seqs)

    @staticmethod
    def make(max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int = 0) -> "Buckets":
        decode = _powers(min(8, max_num_seqs), max_num_seqs, 2)
        mixed = _powers(min(64, max_num_batched_tokens), max_num_batched_tokens, 4)
        rows = max(max_num_seqs, min(max_num_seqs * (1 + num_speculative_tokens), max_num_batched_tokens))
        return Buckets(tuple(decode), tuple(mixed), max_num_seqs, rows)

    @property
    def mixed_s(self) -> int:
        return self.mixed_seqs or self.max_num_seqs

    def pick(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int, bool]:
        """→ (padded tokens, padded seqs, decode_only)."""
        if decode_only:
            s = next(b for b in self.decode if b >= num_seqs)
            return s, s, True
        t = next(b for b in self.mixed if b >= num_tokens)
        if num_seqs > self.mixed_s:
            raise ValueError(f"sampling rows={num_seqs} is invalid: must be <= the mixed buckets' S={self.mixed_s}")
        return t, self.mixed_s, False

    def all(self) -> list[tuple[int, int, bool]]:
        return [(s, s, True) for s in self.decode] + [(t, self.mixed_s, False) for t in self.mixed]

    def describe(self) -> str:
        return (f"decode T=S in {list(self.decode)}; mixed T in {list(self.mixed)} with S={self.mixed_s}")
