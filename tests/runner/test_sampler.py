"""The on-device sampler (jaxllm/runner/sampler.py) against a numpy reference of its documented
order of operations: allowed_token_ids -> logit_bias -> penalties -> min_tokens mask -> greedy | temperature -> top-k -> top-p ->
min-p -> draw. Distributions are checked by chi-square over thousands of draws at one position."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllm.runner.sampler import MAX_LOGPROBS, SAMPLE_PLANS, SamplePlan, SamplingInputs, apply_penalties, plan_of, sample

V = 64
M = 4  # mask id columns
B = 5  # logit_bias columns
A = 6  # allowed_token_ids columns

_sample = jax.jit(sample)
_penalties = jax.jit(apply_penalties)


def make_inputs(S, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence=0.0, frequency=0.0,
                repetition=1.0, seeds=None, positions=None, mask_ids=None, bias_ids=None, bias_values=None,
                allowed_ids=None, bitmask=None, constrained=None) -> SamplingInputs:
    def col(v, dtype):
        return np.broadcast_to(np.asarray(v, dtype), (S,)).copy()

    def ids(v, width, fill=-1, dtype=np.int32):
        return np.full((S, width), fill, dtype) if v is None else np.asarray(v, dtype)
    seeds = np.arange(S) if seeds is None else seeds
    positions = np.full(S, 7) if positions is None else positions
    return SamplingInputs(col(temperature, np.float32), col(top_k, np.int32), col(top_p, np.float32),
                          col(min_p, np.float32), col(presence, np.float32), col(frequency, np.float32),
                          col(repetition, np.float32), col(seeds, np.uint32), col(positions, np.int32),
                          ids(mask_ids, M), ids(bias_ids, B), ids(bias_values, B, 0.0, np.float32), ids(allowed_ids, A),
                          ids(bitmask, -(-V // 32), 0), col(False if constrained is None else constrained, bool))


def _pad(x, rows, fill):
    x = np.asarray(x)
    pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, x.dtype)
    return np.concatenate([x, pad])


def run(logits, p: SamplingInputs, counts=None, seen=None, want=False):
    """Pads the batch to 16 or 4096 rows (two compiles for the whole file) and runs the jitted sampler."""
    S = logits.shape[0]
    R = 16 if S <= 16 else 4096
    counts = np.zeros((S, V), np.int32) if counts is None else counts
    seen = np.zeros((S, V), bool) if seen is None else seen
    fills = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence=0.0, frequency=0.0, repetition=1.0,
                 seeds=0, positions=0, mask_ids=-1, bias_ids=-1, bias_values=0.0, allowed_ids=-1,
                 bitmask=0, constrained=False)
    p = SamplingInputs(**{k: _pad(getattr(p, k), R, f) for k, f in fills.items()})
    out = _sample(jnp.asarray(_pad(logits, R, 0.0), jnp.float32), _pad(counts, R, 0), _pad(seen, R, False), p,
                  np.asarray(want))
    out = jax.device_get(out)
    return type(out)(*(np.asarray(getattr(out, f.name))[:S] for f in dataclasses.fields(out)))


# ----- numpy reference ----------------------------------------------------------------------
def ref_penalties(logits, counts, seen_prompt, rep, freq, pres):
    logits = logits.astype(np.float64).copy()
    seen = seen_prompt | (counts > 0)
    rep = np.broadcast_to(rep, logits.shape)
    logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * counts - pres * (counts > 0)


def ref_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The truncated, renormalised distribution one row samples from (float64)."""
    scaled = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    k = top_k if 0 < top_k < V else V
    probs = np.exp(scaled[order][:k] - scaled[order][0])
    probs /= probs.sum()  # top-k renormalised
    keep = (np.cumsum(probs) - probs) < top_p  # smallest prefix whose mass reaches top_p
    keep &= probs >= min_p * probs[0]
    keep[0] = True
    out = np.zeros(V)
    kept = order[:k][keep]
    e = np.exp(scaled[kept] - scaled[kept].max())
    out[kept] = e / e.sum()
    return out


def ref_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def chi_square_p(observed_ids, expected_probs):
    """p-value of the draws against expected_probs; tokens with probability 0 must never appear."""
    n = len(observed_ids)
    obs = np.bincount(observed_ids, minlength=V).astype(np.float64)
    zero = expected_probs == 0
    assert obs[zero].sum() == 0, f"drew filtered tokens {np.nonzero(obs * zero)[0].tolist()}"
    exp = expected_probs * n
    big = exp >= 5
    o = list(obs[big])
    e = list(exp[big])
    if (~big & ~zero).any():  # pool the rare tokens into one bin
        o.append(obs[~big & ~zero].sum())
        e.append(exp[~big & ~zero].sum())
    assert len(o) >= 2
    return stats.chisquare(o, e).pvalue


def base_logits(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1.5, V)).astype(np.float32)


N_DRAWS = 4000

CASES = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=1.6),
    "top_k": dict(temperature=1.0, top_k=10),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "combined": dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("vary", ["seed", "position"])
def test_distribution_matches_truncated_softmax(case, vary):
    kw = CASES[case]
    logits = np.tile(base_logits(), (N_DRAWS, 1))
    if vary == "seed":  # one position, a different request seed per draw
        p = make_inputs(N_DRAWS, seeds=np.arange(N_DRAWS) + 1000, positions=np.full(N_DRAWS, 5), **kw)
    else:  # one seed, a different position per draw
        p = make_inputs(N_DRAWS, seeds=np.full(N_DRAWS, 42), positions=np.arange(N_DRAWS), **kw)
    ids = run(logits, p).token_ids
    want = ref_probs(logits[0], **kw)
    assert 1 < (want > 0).sum()
    if case != "temperature" and case != "hot":
        assert (want > 0).sum() < V, "the filter under test removes nothing: the case is too weak"
    pval = chi_square_p(ids, want)
    assert pval > 1e-4, (case, vary, pval)
    # the test has power: the same draws are rejected against the untruncated/unscaled softmax
    wrong = ref_probs(logits[0], temperature=1.0)
    if case in ("temperature", "hot"):
        assert chi_square_p(ids, wrong) < 1e-6
    else:
        obs = np.bincount(ids, minlength=V)
        assert (obs[want == 0] == 0).all() and (wrong[want == 0] * N_DRAWS).sum() > 20


def test_draws_differ_across_seeds_and_positions_but_repeat_for_same_key():
    logits = np.tile(base_logits(), (8, 1))
    a = run(logits, make_inputs(8, seeds=np.full(8, 3), positions=np.full(8, 11))).token_ids
    assert len(set(a.tolist())) == 1  # same (seed, position) -> same token in every row
    b = run(logits, make_inputs(8, seeds=np.full(8, 3), positions=np.full(8, 11))).token_ids
    np.testing.assert_array_equal(a, b)
    c = run(np.tile(base_logits(), (256, 1)), make_inputs(256, seeds=np.arange(256))).token_ids
    assert len(set(c.tolist())) > 10


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (16, V)).astype(np.float32)
    # irrelevant filters on greedy rows must not matter
    out = run(logits, make_inputs(16, temperature=0.0, top_k=3, top_p=0.2, min_p=0.5))
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_penalties_match_numpy():
    rng = np.random.default_rng(2)
    S = 12
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    counts = rng.integers(0, 4, (S, V)).astype(np.int32) * (rng.random((S, V)) < 0.3)
    seen = rng.random((S, V)) < 0.2
    rep = rng.uniform(0.5, 2.0, S).astype(np.float32)
    freq = rng.uniform(-2, 2, S).astype(np.float32)
    pres = rng.uniform(-2, 2, S).astype(np.float32)
    p = make_inputs(S, temperature=0.0, repetition=rep, frequency=freq, presence=pres)
    got = np.asarray(_penalties(jnp.asarray(logits), counts, seen, p))
    want = ref_penalties(logits, counts, seen, rep[:, None], freq[:, None], pres[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - logits).max() > 0.5  # the penalties did something
    # through sample(): greedy picks the argmax of the penalised logits, not of the raw ones
    out = run(logits, p, counts, seen)
    np.testing.assert_array_equal(out.token_ids, want.argmax(-1))
    assert (want.argmax(-1) != logits.argmax(-1)).any()
    # and a sampled row draws from the penalised distribution
    n = 3000
    lg = np.tile(logits[0], (n, 1))
    pn = make_inputs(n, temperature=1.0, repetition=rep[0], frequency=freq[0], presence=pres[0],
                     seeds=np.arange(n))
    ids = run(lg, pn, np.tile(counts[0], (n, 1)), np.tile(seen[0], (n, 1))).token_ids
    assert chi_square_p(ids, ref_probs(want[0], 1.0)) > 1e-4


def test_min_tokens_mask():
    rng = np.random.default_rng(3)
    S = 6
    logits = rng.normal(0, 1, (S, V)).astype(np.float32)
    best = logits.argmax(-1)
    logits[np.arange(S), best] += 20  # the masked token would win by far
    mask = np.full((S, M), -1, np.int32)
    mask[:3, 0] = best[:3]  # rows 0..2 forbid their argmax; rows 3..5 forbid nothing
    mask[1, 1] = 5
    out = run(logits, make_inputs(S, temperature=0.0, mask_ids=mask))
    second = np.argsort(-logits, axis=-1)[:, 1]
    np.testing.assert_array_equal(out.token_ids[:3], second[:3])
    np.testing.assert_array_equal(out.token_ids[3:], best[3:])
    # sampled rows never draw a masked token, even when it carries almost all the mass
    n = 2000
    lg = np.tile(logits[0], (n, 1))
    m = np.full((n, M), -1, np.int32)
    m[:, 0] = best[0]
    ids = run(lg, make_inputs(n, temperature=1.0, mask_ids=m)).token_ids
    assert (ids != best[0]).all()
    ref = logits[0].astype(np.float64).copy()
    ref[best[0]] = -np.inf
    assert chi_square_p(ids, ref_probs(ref, 1.0)) > 1e-4


def test_rows_are_independent_of_the_batch():
    rng = np.random.default_rng(4)
    S = 8
    target = rng.normal(0, 2, V).astype(np.float32)
    variants = {
        # target row: plain sampling; others plain too (filter branch not taken)
        "plain": dict(temperature=1.0),
        # target row: top-p; forces the filter branch
        "filtered": dict(temperature=0.9, top_p=0.7, top_k=30),
        "greedy": dict(temperature=0.0),
    }
    for name, kw in variants.items():
        results = []
        for trial in range(4):
            logits = rng.normal(0, 2, (S, V)).astype(np.float32)
            logits[3] = target
            cols = dict(temperature=rng.uniform(0.5, 1.5, S), top_k=np.zeros(S, np.int64), top_p=np.ones(S),
                        min_p=np.zeros(S), seeds=rng.integers(0, 2**31, S), positions=rng.integers(0, 500, S))
            if trial % 2 == 1:  # other rows take the filter path and greedy
                cols["top_k"][0] = 5
                cols["min_p"][1] = 0.2
                cols["temperature"][2] = 0.0
            for k, v in kw.items():
                cols[k][3] = v
            cols["seeds"][3] = 1234
            cols["positions"][3] = 77
            counts = rng.integers(0, 2, (S, V)).astype(np.int32)  # other rows' penalty state
            counts[3] = 0
            seen = rng.random((S, V)) < 0.1
            seen[3] = False
            p = make_inputs(S, presence=np.where(np.arange(S) == 3, 0.0, 0.5), **cols)
            out = run(logits, p, counts, seen, want=bool(trial % 2))
            results.append((int(out.token_ids[3]), float(out.logprobs[3])))
        # alone, in a batch of one (another shape) and with no other row filtering
        alone = make_inputs(1, seeds=[1234], positions=[77], **kw)
        one = run(target[None], alone)
        results.append((int(one.token_ids[0]), float(one.logprobs[0])))
        assert len(set(results)) == 1, (name, results)
        if name == "filtered":  # the row really draws from its truncated distribution
            assert ref_probs(target, **kw)[results[0][0]] > 0


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(5)
    S = 10
    logits = rng.normal(0, 4, (S, V)).astype(np.float32)
    counts = (rng.random((S, V)) < 0.2).astype(np.int32)
    # penalties and filters change what is drawn but not the reported (raw) logprobs
    p = make_inputs(S, temperature=np.linspace(0, 1.5, S), top_k=np.where(np.arange(S) % 2, 8, 0),
                    repetition=1.3, frequency=0.5, seeds=np.arange(S))
    out = run(logits, p, counts, want=True)
    lsm = ref_log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, lsm[np.arange(S), out.token_ids], rtol=1e-5, atol=1e-5)
    order = np.argsort(-lsm, axis=-1, kind="stable")[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(lsm, order, -1), rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == (S, MAX_LOGPROBS)


def test_rank_of_the_sampled_token_in_the_full_distribution():
    """vLLM's rank: 1 + how many raw logits are strictly greater than the sampled token's; hot
    temperature draws land far outside the top MAX_LOGPROBS, greedy rows are rank 1, ties share."""
    rng = np.random.default_rng(11)
    S = 200
    logits = np.tile(rng.normal(0, 1, V).astype(np.float32), (S, 1))
    logits[:, 3] = logits[:, 5] = logits[0].max() + 1  # a tie at the top
    temperature = np.where(np.arange(S) < 4, 0.0, 8.0)  # 4 greedy rows, the rest nearly uniform
    out = run(logits, make_inputs(S, temperature=temperature, seeds=np.arange(S), repetition=1.2),
              counts=(rng.random((S, V)) < 0.3).astype(np.int32), want=True)
    ref = 1 + (logits > logits[np.arange(S), out.token_ids][:, None]).sum(-1)  # independent of the sampler
    np.testing.assert_array_equal(out.ranks, ref)
    assert (out.ranks[:4] == 1).all() and set(out.token_ids[:4]) <= {3, 5}  # the tie: both rank 1
    assert (out.ranks > MAX_LOGPROBS).sum() > 20  # many draws outside any top-k
    assert out.ranks.dtype == np.int32


def test_allowed_token_ids_and_logit_bias():
    """Allowed ids, then bias, then penalties (vLLM's order); greedy and sampled rows, mutation-tight:
    the reference applies the same steps in numpy, and rows without lists are untouched."""
    rng = np.random.default_rng(7)
    S = 6
    logits = rng.normal(0, 1, (S, V)).astype(np.float32)
    allowed = np.full((S, A), -1, np.int32)
    allowed[0, :3] = [5, 9, 40]  # row 0 may only pick among these
    allowed[2, :2] = [7, 7]  # duplicates are harmless
    bias_ids = np.full((S, B), -1, np.int32)
    bias_vals = np.zeros((S, B), np.float32)
    bias_ids[1, :2], bias_vals[1, :2] = [11, 12], [50.0, -50.0]  # row 1: 11 forced, 12 banned
    bias_ids[2, 0], bias_vals[2, 0] = 7, -100.0  # row 2: its only allowed id, biased: still the pick
    # row 3: the order decides. Token 20 (seen, logit 2, bias +2) vs token 21 (logit 3): bias then
    # repetition penalty 1.5 gives (2 + 2) / 1.5 = 2.67 < 3, so 21 wins; penalty first would give
    # 2 / 1.5 + 2 = 3.33 and pick 20.
    logits[3] = -5.0
    logits[3, 20], logits[3, 21] = 2.0, 3.0
    bias_ids[3, :2], bias_vals[3, :2] = [21, 20], [0.0, 2.0]
    rep = np.full(S, 1.0, np.float32)
    rep[3] = 1.5
    seen = np.zeros((S, V), bool)
    seen[3, 20] = True
    out = run(logits, make_inputs(S, temperature=0.0, repetition=rep, bias_ids=bias_ids, bias_values=bias_vals,
                                  allowed_ids=allowed), seen=seen)
    ref = logits.astype(np.float64).copy()
    for i in range(S):
        ok = allowed[i][allowed[i] >= 0]
        if len(ok):
            keep = np.zeros(V, bool)
            keep[ok] = True
            ref[i, ~keep] = -np.inf
        for t, b in zip(bias_ids[i], bias_vals[i]):
            if t >= 0:
                ref[i, t] += b
    ref = ref_penalties(ref, np.zeros((S, V)), seen, rep[:, None], 0.0, 0.0)
    np.testing.assert_array_equal(out.token_ids, ref.argmax(-1))
    assert out.token_ids[0] in (5, 9, 40) and out.token_ids[1] == 11 and out.token_ids[2] == 7
    assert out.token_ids[3] == 21
    np.testing.assert_array_equal(out.token_ids[4:], logits[4:].argmax(-1))
    # logprobs stay those of the raw model distribution
    np.testing.assert_allclose(out.logprobs, ref_log_softmax(logits)[np.arange(S), out.token_ids], rtol=1e-5, atol=1e-5)
    # sampled: draws follow the softmax over the allowed, biased logits
    n = 3000
    lg = np.tile(logits[0], (n, 1))
    al = np.tile(allowed[0], (n, 1))
    bi, bv = np.full((n, B), -1, np.int32), np.zeros((n, B), np.float32)
    bi[:, 0], bv[:, 0] = 9, 1.5
    ids = run(lg, make_inputs(n, temperature=1.0, seeds=np.arange(n), allowed_ids=al, bias_ids=bi,
                              bias_values=bv)).token_ids
    assert set(np.unique(ids)) <= {5, 9, 40}
    want = np.full(V, -np.inf)
    want[[5, 9, 40]] = logits[0, [5, 9, 40]]
    want[9] += 1.5
    assert chi_square_p(ids, ref_probs(want, 1.0)) > 1e-4


_sample_select = jax.jit(functools.partial(sample, branchless=True), static_argnames=("plan",))


@pytest.mark.parametrize("mix", ["nothing", "everything", "mixed"])
def test_branchless_sampling_equals_the_branching_one(mix):
    """GPUs sample without lax.cond (an XLA conditional blocks the host there): every branch computed
    and selected by the same predicate must give exactly what the branching sampler gives, whether no
    row, every row or some rows take each branch (grammar, allowed/bias, penalties, masks, filters,
    draw, top logprobs)."""
    S, rng = 16, np.random.default_rng({"nothing": 0, "everything": 1, "mixed": 2}[mix])
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    on = np.ones(S, bool) if mix == "everything" else np.zeros(S, bool) if mix == "nothing" else rng.random(S) < 0.5

    def pick(values, off):
        return np.where(on.reshape((S,) + (1,) * (np.ndim(values) - 1)), values, off)

    ids = lambda w: pick(rng.integers(0, V, (S, w)), -1).astype(np.int32)  # noqa: E731
    p = make_inputs(
        S, temperature=pick(rng.uniform(0.5, 1.5, S), 0.0), top_k=pick(rng.integers(1, V, S), 0),
        top_p=pick(rng.uniform(0.3, 0.95, S), 1.0), min_p=pick(rng.uniform(0, 0.2, S), 0.0),
        presence=pick(rng.uniform(0, 1, S), 0.0), frequency=pick(rng.uniform(0, 1, S), 0.0),
        repetition=pick(rng.uniform(1, 2, S), 1.0), seeds=np.arange(S), positions=rng.integers(0, 99, S),
        mask_ids=ids(M), bias_ids=ids(B), bias_values=rng.normal(size=(S, B)), allowed_ids=ids(A),
        bitmask=rng.integers(-2**31, 2**31, (S, -(-V // 32))), constrained=on)
    counts = rng.integers(0, 3, (S, V)).astype(np.int32)
    seen = rng.random((S, V)) < 0.2
    want = np.asarray(mix != "nothing")
    ref = jax.device_get(_sample(jnp.asarray(logits), counts, seen, p, want))
    plan = plan_of(p, want, V)  # the host's choice of program: nothing computed that no row needs
    assert plan == (SamplePlan(False, False, False) if mix == "nothing" else SamplePlan(True, True, True))
    assert plan in SAMPLE_PLANS
    got = jax.device_get(_sample_select(jnp.asarray(logits), counts, seen, p, want, plan=plan))
    np.testing.assert_array_equal(got.token_ids, ref.token_ids)
    np.testing.assert_array_equal(got.ranks, ref.ranks)
    np.testing.assert_array_equal(got.top_ids, ref.top_ids)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.top_logprobs, ref.top_logprobs, rtol=1e-6, atol=1e-6)
    if mix == "mixed":  # the inputs really took both sides somewhere
        assert on.any() and not on.all() and (ref.token_ids != logits.argmax(-1)).any()


def test_sampler_branches_setting(monkeypatch):
    from jaxllm.runner.sampler import BRANCHES_ENV, sampler_branchless

    monkeypatch.delenv(BRANCHES_ENV, raising=False)
    assert sampler_branchless("cpu") is False and sampler_branchless("gpu") is True
    assert sampler_branchless("tpu") is False  # a TPU's conditionals run on the device
    monkeypatch.setenv(BRANCHES_ENV, "select")
    assert sampler_branchless("cpu") is True
    monkeypatch.setenv(BRANCHES_ENV, "cond")
    assert sampler_branchless("gpu") is False
    monkeypatch.setenv(BRANCHES_ENV, "sometimes")
    with pytest.raises(ValueError, match="JAXLLM_SAMPLER_BRANCHES='sometimes' is invalid: must be one of auto, cond, select"):
        sampler_branchless("gpu")


def test_branchless_sampling_program_has_no_device_branch():
    """The sampling program the runner ships off the CPU (step_programs(..., branchless_sampling=True))
    lowers without a conditional (StableHLO case/if: on a GPU each one is a host round trip), and the
    CPU's keeps them (they skip the work a batch does not need)."""
    from jaxllm.runner.step_programs import step_programs

    S, R = 4, 8
    p = make_inputs(S)
    args = (jax.ShapeDtypeStruct((S, V), jnp.float32), np.zeros((R, V), np.int32), np.zeros((R, V), bool),
            np.zeros(R, np.int32), p, np.asarray(False), np.arange(S, dtype=np.int32))
    lower = lambda b, plan: jax.jit(step_programs(None, lambda: None, b).sample_step,  # noqa: E731
                                    static_argnames=("plan",)).lower(*args, plan=plan).as_text()
    cond = lower(False, SAMPLE_PLANS[-1])
    assert "stablehlo.case" in cond or "stablehlo.if" in cond
    texts = {plan: lower(True, plan) for plan in SAMPLE_PLANS}
    for plan, text in texts.items():
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, plan
        # what the host left out is not in the program: the filters' sort, the draw's random bits, top-k
        assert ("stablehlo.sort" in text) is plan.filters, plan
        assert ("threefry" in text or "rng_bit_generator" in text) is plan.draw, plan
        assert ("top_k" in text) is plan.top_logprobs, plan


def test_branchless_plain_draws_without_filters_or_logprobs():
    """The plan that draws but leaves out the filters' sort and the top logprobs (temperature only):
    the same tokens and logprobs as the branching sampler."""
    S, rng = 16, np.random.default_rng(3)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    p = make_inputs(S, temperature=np.where(np.arange(S) % 2 == 0, 0.0, rng.uniform(0.5, 1.5, S)), seeds=np.arange(S))
    counts, seen, want = np.zeros((S, V), np.int32), np.zeros((S, V), bool), np.asarray(False)
    plan = plan_of(p, want, V)
    assert plan == SamplePlan(True, False, False)
    ref = jax.device_get(_sample(jnp.asarray(logits), counts, seen, p, want))
    got = jax.device_get(_sample_select(jnp.asarray(logits), counts, seen, p, want, plan=plan))
    np.testing.assert_array_equal(got.token_ids, ref.token_ids)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)
    assert (ref.token_ids[1::2] != logits[1::2].argmax(-1)).any()  # some draws left the argmax
