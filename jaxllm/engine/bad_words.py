"""bad_words (vLLM's SamplingParams field), host side (no jax): tokenizing the words once at admission
and, each step, the token ids the sampler must not pick.

Tokenization follows vLLM's ``update_from_tokenizer``: each word, left-stripped, is encoded without
special tokens as is; then with one leading space, kept as a second sequence only when that gives as
many tokens as the first and a different first token (a tokenizer that folds the space into the
word's first token, as BPE vocabularies do). The ban follows vLLM's ``apply_bad_words``: a sequence's
last token is banned when the request's generated tokens end with the sequence's other tokens (a
one-token sequence always). Prompt tokens never count.

The banned ids travel to the device in the min_tokens mask the sampler already applies
(``SamplingInputs.mask_ids``, fixed width: no new input, no new compiled program); a sequence of
two or more tokens depends on the last token, so such a request is never scheduled on a token still
in flight (``Request.bans_need_last_token``) and gets no speculative drafts.
"""
from __future__ import annotations

from jaxllm.sampling_params import MAX_BAD_WORD_TOKENS, _short


def tokenize_bad_words(words: list[str], tokenizer, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """The token sequences of ``words`` (already validated by SamplingParams); ValueError naming
    bad_words for a model without a tokenizer, a word over MAX_BAD_WORD_TOKENS tokens, or ids past the
    vocabulary."""
    if getattr(tokenizer, "has_text", True) is False:
        raise ValueError(f"bad_words={_short(words)} is invalid: this model has no tokenizer to encode "
                         f"them (token-ids-only model)")
    seqs: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not 1 <= len(plain) <= MAX_BAD_WORD_TOKENS:
            raise ValueError(f"bad_words word {_short(word)} is invalid: it is {len(plain)} tokens, must be "
                             f"1 to {MAX_BAD_WORD_TOKENS}")
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        kept = [plain] + ([spaced] if spaced and spaced[0] != plain[0] and len(spaced) == len(plain) else [])
        for ids in kept:
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"bad_words word {_short(word)} is invalid: token ids {bad} are past the "
                                 f"vocabulary ({vocab_size} ids)")
        seqs += kept
    return tuple(seqs)


def banned_token_ids(seqs: tuple[tuple[int, ...], ...], output_ids: list[int]) -> list[int]:
    """The ids to ban at the next step of a request that generated ``output_ids`` (distinct, in the
    order of ``seqs``)."""
    out: list[int] = []
    n = len(output_ids)
    for ids in seqs:
        k = len(ids) - 1
        if k > n or (k and output_ids[n - k:] != list(ids[:k])):
            continue
        if ids[-1] not in out:
            out.append(ids[-1])
    return out


def attach_bans(out) -> None:
    """Fill ``banned_token_ids`` of the sampling seqs of SchedulerOutput ``out`` whose request has bad
    words. A seq scheduled on a placeholder or with drafts has one-token words only (the scheduler
    sees to it), whose bans do not depend on the tokens not yet appended."""
    for seq, req in zip(out.seqs, out.requests):
        if req.bad_words and seq.sample:
            seq.banned_token_ids = banned_token_ids(req.bad_words, req.output_token_ids)
