"""The sampler's structured-outputs bitmask (jaxllm/runner/sampler.py) against references that do
not share its code: llguidance's own numpy bitmask application for the masked logits, numpy argmax,
the sampler's independent allowed_token_ids path for draws (same keys -> same tokens), and the
unconstrained run for an all-allowing mask."""
from __future__ import annotations

import jax
import numpy as np
from llguidance.numpy import apply_token_bitmask_inplace

from jaxllm.runner.sampler import apply_bitmask
from tests.runner.test_sampler import A, V, make_inputs, ref_log_softmax, run

W = -(-V // 32)


def pack(allowed: np.ndarray) -> np.ndarray:
    """[S, vocab] bool -> [S, ceil(vocab/32)] i32, bit t % 32 of word t // 32 (numpy packbits, not the sampler's code)."""
    S, vocab = allowed.shape
    padded = np.zeros((S, -(-vocab // 32) * 32), bool)
    padded[:, :vocab] = allowed
    little = np.packbits(padded.reshape(S, -1, 32), axis=-1, bitorder="little")  # [S, W, 4] u8, bit 0 first
    return np.ascontiguousarray(little.view("<u4")[..., 0].view(np.int32))


def random_masks(rng, S, vocab, p=0.3):
    """[S, ceil(vocab/32)] i32 packed bits and the [S, vocab] bool truth (never an empty row)."""
    allowed = rng.random((S, vocab)) < p
    allowed[np.arange(S), rng.integers(0, vocab, S)] = True
    return pack(allowed), allowed


def test_masked_logits_match_llguidance_numpy_reference():
    rng = np.random.default_rng(0)
    for vocab in (64, 70, 95):  # 70, 95: the last word only partly used
        S = 9
        logits = rng.normal(0, 3, (S, vocab)).astype(np.float32)
        masks, truth = random_masks(rng, S, vocab)
        masks[0], truth[0] = -1, True  # every bit, including bit 31 (the sign)
        constrained = np.arange(S) % 3 != 2  # rows 2, 5, 8 are free
        got = np.asarray(jax.jit(apply_bitmask)(logits, masks, constrained))
        ref = logits.copy()
        sub = ref[constrained]  # a copy (fancy indexing): masked in place, then written back
        apply_token_bitmask_inplace(sub, masks[constrained])
        ref[constrained] = sub
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(np.isfinite(got[constrained]), truth[constrained])  # packing truth
        np.testing.assert_array_equal(got[~constrained], logits[~constrained])


def test_greedy_and_sampled_ids_respect_the_mask_and_equal_the_allowed_ids_path():
    rng = np.random.default_rng(1)
    S = 12
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    _, truth = random_masks(rng, S, V, p=A / V)
    for i in range(S):  # at most A allowed ids per row, so allowed_token_ids can express the same set
        ids = np.flatnonzero(truth[i])[:A]
        truth[i] = False
        truth[i, ids] = True
    masks = pack(truth)
    allowed_ids = np.full((S, A), -1, np.int32)
    for i in range(S):
        ids = np.flatnonzero(truth[i])
        allowed_ids[i, :len(ids)] = ids
    temperature = np.where(np.arange(S) < 4, 0.0, 1.0)  # 4 greedy rows, 8 sampled
    seeds, positions = rng.integers(0, 2**31, S), rng.integers(0, 1000, S)
    kw = dict(temperature=temperature, seeds=seeds, positions=positions)
    by_mask = run(logits, make_inputs(S, bitmask=masks, constrained=True, **kw), want=True)
    by_ids = run(logits, make_inputs(S, allowed_ids=allowed_ids, **kw), want=True)
    masked = np.where(truth, logits, -np.inf)
    np.testing.assert_array_equal(by_mask.token_ids[:4], masked[:4].argmax(-1))
    assert truth[np.arange(S), by_mask.token_ids].all()
    np.testing.assert_array_equal(by_mask.token_ids, by_ids.token_ids)
    # logprobs stay those of the raw distribution (vLLM's default), not of the masked one
    lsm = ref_log_softmax(logits)
    np.testing.assert_allclose(by_mask.logprobs, lsm[np.arange(S), by_mask.token_ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(by_mask.ranks, 1 + (logits > logits[np.arange(S), by_mask.token_ids][:, None]).sum(-1))


def test_all_allowing_mask_gives_the_unconstrained_tokens():
    rng = np.random.default_rng(2)
    S = 16
    logits = rng.normal(0, 2, (S, V)).astype(np.float32)
    kw = dict(temperature=np.where(np.arange(S) % 4 == 0, 0.0, 1.0), seeds=rng.integers(0, 2**31, S),
              positions=rng.integers(0, 1000, S), top_k=np.where(np.arange(S) % 3 == 0, 10, 0), repetition=1.2)
    counts = (rng.random((S, V)) < 0.2).astype(np.int32)
    free = run(logits, make_inputs(S, **kw), counts, want=True)
    full = run(logits, make_inputs(S, bitmask=np.full((S, W), -1, np.int32), constrained=True, **kw), counts,
               want=True)
    for f in ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(full, f), getattr(free, f), err_msg=f)


def test_a_mask_on_unconstrained_rows_is_ignored():
    """The flag gates the mask: a free row beside constrained ones keeps its token."""
    rng = np.random.default_rng(3)
    S = 8
    logits = rng.normal(0, 2, (S, V)).astype(np.float32)
    masks, truth = random_masks(rng, S, V, p=0.1)
    constrained = np.arange(S) % 2 == 0
    kw = dict(temperature=1.0, seeds=rng.integers(0, 2**31, S), positions=rng.integers(0, 1000, S))
    mixed = run(logits, make_inputs(S, bitmask=masks, constrained=constrained, **kw))
    free = run(logits, make_inputs(S, **kw))
    np.testing.assert_array_equal(mixed.token_ids[~constrained], free.token_ids[~constrained])
    assert truth[np.arange(S), mixed.token_ids][constrained].all()
