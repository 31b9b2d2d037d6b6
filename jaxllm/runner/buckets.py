"""Declared shape buckets: every step pads to one of these, all compiled at warm-up.

Three kinds of step (``Buckets.kind``):
- decode: one new token per sequence; T == S from the ``decode`` sizes.
- draft (speculative decoding, K drafts at most): every sequence decodes, each with 0..K drafts,
  at least one with some. Every token then is a sampling row (a seq with d drafts feeds d + 1
  tokens and samples d + 1 rows), so T == S again, from the ``draft`` sizes: powers of 2 from
  the smallest decode size up to min(max_num_seqs * (1 + K), max_num_batched_tokens), plus each
  decode size times (1 + K). Not decode-only (the attention runs ragged queries).
- mixed: anything else (prefill chunks); T from the ``mixed`` token sizes with S = ``mixed_seqs``:
  max_num_seqs, or with speculative decoding the most sampling rows a step can have
  (min(max_num_seqs * (1 + K), max_num_batched_tokens)).
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
    mixed: tuple[int, ...]  # token counts for prefill/mixed steps (S = mixed_s)
    max_num_seqs: int
    mixed_seqs: int = 0  # S of mixed steps (0: max_num_seqs)
    draft: tuple[int, ...] = ()  # token counts (== sampling rows) of draft steps; () without drafts

    @staticmethod
    def make(max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int = 0) -> "Buckets":
        decode = _powers(min(8, max_num_seqs), max_num_seqs, 2)
        mixed = _powers(min(64, max_num_batched_tokens), max_num_batched_tokens, 4)
        k = num_speculative_tokens
        rows = max(max_num_seqs, min(max_num_seqs * (1 + k), max_num_batched_tokens))
        draft = ()
        if k:
            draft = tuple(sorted(set(_powers(decode[0], rows, 2)) | {s * (1 + k) for s in decode if s * (1 + k) <= rows}))
        return Buckets(tuple(decode), tuple(mixed), max_num_seqs, rows, draft)

    @property
    def mixed_s(self) -> int:
        return self.mixed_seqs or self.max_num_seqs

    @staticmethod
    def kind(seqs) -> str:
        """"decode" | "draft" | "mixed" for a step's ScheduledSeqs (see the module doc)."""
        if all(len(s.token_ids) == 1 for s in seqs):
            return "decode"
        if all(len(s.token_ids) == 1 + s.num_draft_tokens for s in seqs):
            return "draft"
        return "mixed"

    def pick(self, num_tokens: int, num_seqs: int, decode_only: bool, draft: bool = False) -> tuple[int, int, bool]:
        """→ (padded tokens, padded seqs, decode_only). `num_seqs`: sampling rows; `draft`: a
        draft step (tokens == rows), which runs a draft bucket when one holds it."""
        if decode_only:
            s = next(b for b in self.decode if b >= num_seqs)
            return s, s, True
        if draft and self.draft and max(num_tokens, num_seqs) <= self.draft[-1]:
            t = next(b for b in self.draft if b >= max(num_tokens, num_seqs))
            return t, t, False
        t = next(b for b in self.mixed if b >= num_tokens)
        if num_seqs > self.mixed_s:
            raise ValueError(f"sampling rows={num_seqs} is invalid: must be <= the mixed buckets' S={self.mixed_s}")
        return t, self.mixed_s, False

    def pick_step(self, seqs) -> tuple[int, int, bool]:
        """pick() for a step's ScheduledSeqs (tokens, sampling rows and kind from them)."""
        kind = self.kind(seqs)
        tokens = sum(len(s.token_ids) for s in seqs)
        rows = sum(1 + s.num_draft_tokens for s in seqs)
        return self.pick(tokens, rows, kind == "decode", kind == "draft")

    def label(self, seqs) -> str:
        """The step's bucket as a metric label: "decode_8", "draft_40", "mixed_64"."""
        T, S, decode_only = self.pick_step(seqs)
        kind = "decode" if decode_only else ("draft" if T == S and T in self.draft and self.kind(seqs) == "draft"
                                             else "mixed")
        return f"{kind}_{T}"

    def all(self) -> list[tuple[int, int, bool]]:
        """Every bucket (T, S, decode_only), each once (a draft bucket may equal a mixed one)."""
        out = [(s, s, True) for s in self.decode] + [(t, t, False) for t in self.draft]
        return out + [b for b in ((t, self.mixed_s, False) for t in self.mixed) if b not in out]

    def sample_sizes(self) -> list[int]:
        """The distinct numbers of sampling rows S of the buckets (one sampling program each)."""
        return sorted({S for _, S, _ in self.all()})

    def describe(self) -> str:
        draft = f"; draft T=S in {list(self.draft)}" if self.draft else ""
        return f"decode T=S in {list(self.decode)}; mixed T in {list(self.mixed)} with S={self.mixed_s}{draft}"
