"""N-gram speculative proposals ("prompt lookup" decoding), host only (no jax, no numpy).

vLLM's ``--speculative-config '{"method": "ngram", "num_speculative_tokens": K,
"prompt_lookup_max": 4, "prompt_lookup_min": 1}'``: the sequence's own tokens (prompt + output)
are searched for an earlier occurrence of their last n tokens, n from ``prompt_lookup_max`` down
to ``prompt_lookup_min`` (the longest match wins); the up-to-K tokens that followed that earlier
occurrence are the drafts the target model verifies in the next step.

Among earlier occurrences of the longest matched n-gram the EARLIEST one is used (as vLLM V1's
first proposer did). The drafts are ``tokens[j + 1 : j + 1 + K]`` for the match ending at ``j``;
they may run into the matched suffix itself and are fewer than K when the sequence ends first.

Cost: the tokens are kept as packed int32 bytes per request (``NgramProposer``: only the new
tokens are packed each step), and each n is one C-level ``bytes.find`` (a hit not aligned to a token
boundary is skipped); no Python loop over the sequence. ``python -m tests.core.test_ngram_proposer``
prints µs per proposal on 2k-token sequences.
"""

from __future__ import annotations

from array import array
from collections.abc import Container, Hashable, Iterable, Sequence

_W = 4  # bytes per packed token (int32)


def _find(buf: bytes | bytearray, num: int, n: int, start: int) -> int:
    """Byte offset of the earliest token-aligned occurrence, at or after byte ``start``, of the
    last ``n`` tokens that ends before the last token (so a follower exists); -1 if none."""
    pat = buf[(num - n) * _W:num * _W]
    end = (num - 1) * _W
    pos = buf.find(pat, start, end)
    while pos >= 0 and pos % _W:
        pos = buf.find(pat, pos + 1, end)
    return pos


def _find_longest(buf: bytes | bytearray, num: int, min_n: int, max_n: int) -> int:
    """The token index where the earliest occurrence of the longest matched suffix n-gram ends
    (strictly before the last token), or -1. The min_n-gram is searched first: without it no longer
    one occurs (one scan for text with no match), and a longer one's earliest occurrence ends no
    earlier than its, so the longer searches start there."""
    if min_n > num - 1:
        return -1
    first = _find(buf, num, min_n, 0)
    if first < 0:
        return -1
    for n in range(min(max_n, num - 1), min_n, -1):
        pos = _find(buf, num, n, max(0, first - (n - min_n) * _W))
        if pos >= 0:
            return pos // _W + n - 1
    return first // _W + min_n - 1


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` draft tokens for ``tokens`` (see the module doc); ``[]`` when no n-gram of
    size ``min_n..max_n`` ending the sequence occurs earlier in it. Stateless (packs the whole
    sequence); the engine uses ``NgramProposer``, which packs incrementally."""
    num = len(tokens)
    if k <= 0 or num < min_n + 1:
        return []
    j = _find_longest(array("i", tokens).tobytes(), num, min_n, max_n)
    return [] if j < 0 else list(tokens[j + 1:j + 1 + k])


class NgramProposer:
    """Per-request packed token buffers; ``propose(key, all_token_ids)`` packs the tokens appended
    since the last call (a request's known tokens only ever grow: drafts are never in them) and
    returns up to ``k`` drafts. The key must be unique per request for its whole life (the engine
    uses Request.arrival_seq: request ids can be reused). ``forget`` / ``retain`` drop buffers."""

    def __init__(self, k: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = k, min_n, max_n
        self._bufs: dict[Hashable, bytearray] = {}  # request id -> its known tokens, packed int32

    def propose(self, request_id: Hashable, tokens: Sequence[int], k: int | None = None) -> list[int]:
        k = self.k if k is None else k
        num = len(tokens)
        buf = self._bufs.get(request_id)
        if buf is None or len(buf) > num * _W:
            buf = self._bufs[request_id] = bytearray()
        if len(buf) < num * _W:
            buf += array("i", tokens[len(buf) // _W:]).tobytes()
        if k <= 0 or num < self.min_n + 1:
            return []
        j = _find_longest(buf, num, self.min_n, self.max_n)
        return [] if j < 0 else list(tokens[j + 1:j + 1 + k])

    def forget(self, request_ids: Iterable) -> None:
        for rid in request_ids:
            self._bufs.pop(rid, None)

    def retain(self, keep: Container) -> None:
        """Drop every buffer whose key is not in ``keep``."""
        for key in [key for key in self._bufs if key not in keep]:
            del self._bufs[key]
