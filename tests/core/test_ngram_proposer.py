import random
import time

import pytest

from jaxllm.core.ngram_proposer import NgramProposer, propose_ngram


def brute(tokens, k, min_n, max_n):
    """Independent reference: every window, longest n first, earliest window first."""
    num = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n + 1 > num:
            continue
        pattern = tokens[num - n:]
        for i in range(num - n):  # the window ends before the last token, so a follower exists
            if tokens[i:i + n] == pattern:
                return tokens[i + n:i + n + k]
    return []


def test_examples():
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 2, 1, 4) == [4, 1]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 5, 1, 4) == [4, 1, 2, 3]  # runs into the suffix, then ends
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3, 5, 6], 2, 2, 2) == []  # [5, 6] never occurred
    assert propose_ngram([5, 9, 7, 5, 8, 7, 5], 3, 1, 4) == [8, 7, 5]  # the 2-gram [7, 5] beats the 1-gram [5]
    assert propose_ngram([5, 9, 7, 5, 8, 7, 5], 3, 3, 4) == []
    assert propose_ngram([3, 1, 3, 2, 3], 1, 1, 1) == [1]  # earliest of equally long matches
    assert propose_ngram([7], 3, 1, 4) == [] and propose_ngram([], 3, 1, 4) == []
    assert propose_ngram([7, 7], 3, 1, 4) == [7]
    assert propose_ngram([1, 2, 1, 2], 0, 1, 4) == []


@pytest.mark.parametrize("vocab", [2, 3, 8, 50])
def test_matches_brute_force(vocab):
    rng = random.Random(vocab)
    for _ in range(3000):
        toks = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        max_n = rng.randrange(1, 6)
        min_n = rng.randrange(1, max_n + 1)
        k = rng.randrange(1, 7)
        assert propose_ngram(toks, k, min_n, max_n) == brute(toks, k, min_n, max_n), (toks, k, min_n, max_n)
        assert propose_ngram(tuple(toks), k, min_n, max_n) == brute(toks, k, min_n, max_n)


def bench(num_tokens=2048, vocab=32000, reps=2000):
    """µs per proposal on a 2k-token sequence: random text (few matches) and repetitive text."""
    rng = random.Random(0)
    rand = [rng.randrange(vocab) for _ in range(num_tokens)]
    para = [rng.randrange(vocab) for _ in range(100)]
    rep = (para * (num_tokens // 100 + 1))[:num_tokens]
    common = [rng.choice((13, 11, 29871, rng.randrange(vocab))) for _ in range(num_tokens)]  # frequent tokens
    res = {}
    for name, toks in (("random", rand), ("repetitive", rep), ("frequent_last_token", common)):
        t = time.perf_counter()
        for _ in range(reps):
            propose_ngram(toks, 4, 1, 4)
        res[f"{name} stateless"] = (time.perf_counter() - t) / reps * 1e6
        prop = NgramProposer(4, 1, 4)
        prop.propose("r", toks[:-1])
        t = time.perf_counter()
        for _ in range(reps):  # the engine's case: one new token since the last step
            prop.propose("r", toks)
            prop._bufs["r"] = prop._bufs["r"][:-4]
        res[f"{name} incremental"] = (time.perf_counter() - t) / reps * 1e6
    return res


if __name__ == "__main__":
    for name, us in bench().items():
        print(f"{name}: {us:.1f} us / sequence (2048 tokens, K=4, n=1..4)")


def test_incremental_proposer_matches_stateless():
    rng = random.Random(7)
    prop = NgramProposer(k=3, min_n=1, max_n=3)
    seqs = {f"r{i}": [rng.randrange(6) for _ in range(rng.randrange(0, 5))] for i in range(4)}
    for _ in range(300):
        rid = rng.choice(list(seqs))
        seqs[rid].extend(rng.randrange(6) for _ in range(rng.randrange(0, 3)))
        k = rng.choice((None, 0, 1, 5))
        want = brute(seqs[rid], 3 if k is None else k, 1, 3)
        assert prop.propose(rid, seqs[rid], k) == want
        if rng.random() < 0.05:  # a finished request's id reused by a new, shorter sequence
            prop.forget([rid])
            seqs[rid] = [rng.randrange(6)]
    prop.forget(list(seqs))
    assert not prop._bufs
