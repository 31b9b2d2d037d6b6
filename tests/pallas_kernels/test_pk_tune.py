"""The decode kernel tuner (pallas_kernels/attention/tune.py): the selection with injected candidates
(fastest wins; raising, mismatching and over-budget candidates dropped and logged; all dropped -> the
one-head kernel), the candidate list, and the real path end to end in Pallas interpret mode on tiny
MHA shapes (bf16 and fp8 caches), where a deliberately wrong candidate must be dropped by the
comparison against the one-head kernel. No timing assertions: injected timers decide the ranking.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from pallas_kernels.attention.tune import (MAX_CANDIDATES, candidate_groups, decode_call, mismatch, select_group,
                                           synthetic_cache_bytes, synthetic_decode_batch, tune_decode_group)

OUT = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(2, 3, 4)  # the one-head kernel's "output"


def _select(outputs: dict, times: dict, **kw):
    """select_group over outputs' keys: an Exception value raises when run; times[g] ms (an Exception: raises)."""
    lines = []

    def run(g):
        if isinstance(outputs[g], Exception):
            raise outputs[g]
        return outputs[g]

    def timer(g):
        if isinstance(times[g], Exception):
            raise times[g]
        return times[g]

    result = select_group(list(outputs), run, timer, log=lines.append, **kw)
    return result, lines


def test_select_picks_the_fastest_matching_candidate():
    result, lines = _select({None: OUT, 8: OUT + 1e-3, 16: OUT, 32: OUT}, {None: 0.9, 8: 0.5, 16: 0.3, 32: 0.4})
    assert result.group == 16 and not result.dropped and lines == []
    assert result.times_ms == {"one-head": 0.9, "G=8": 0.5, "G=16": 0.3, "G=32": 0.4}
    assert result.describe().startswith("chose G=16 (0.30 ms vs 0.90 ms one-head) in ")
    # the one-head kernel wins when it is the fastest, and when a variant is faster by less than MIN_GAIN (3%)
    assert _select({None: OUT, 16: OUT}, {None: 0.2, 16: 0.3})[0].group is None
    assert _select({None: OUT, 16: OUT}, {None: 1.0, 16: 0.98})[0].group is None
    assert _select({None: OUT, 16: OUT}, {None: 1.0, 16: 0.96})[0].group == 16


def test_raising_and_mismatching_candidates_are_dropped_and_logged():
    """G=16 is the fastest on the clock but wrong (one element off by 10% of the output's range); G=32
    raises while compiling; G=8 raises in its timer: each dropped with one line naming it and the
    error's first line. The one-head kernel and the others stay."""
    wrong = OUT.copy()
    wrong[1, 2, 3] += 0.1
    boom = RuntimeError("Triton lowering failed: tile [48, 128] is not a power of two\nlong traceback ...")
    result, lines = _select({None: OUT, 8: OUT, 16: wrong, 32: boom},
                            {None: 0.9, 8: ValueError("timer broke"), 16: 0.1, 32: 0.2})
    assert result.group is None and list(result.times_ms) == ["one-head"]
    assert set(result.dropped) == {"G=8", "G=16", "G=32"}
    assert "mismatch against the one-head kernel" in result.dropped["G=16"]
    assert result.dropped["G=32"] == "RuntimeError: Triton lowering failed: tile [48, 128] is not a power of two"
    assert result.dropped["G=8"] == "ValueError: timer broke"
    assert lines == [f"dropped {k}: {v}" for k, v in result.dropped.items()]
    assert all("\n" not in line for line in lines)
    # a non-finite output is a mismatch too, whatever the clock says
    nan = OUT.copy()
    nan[0, 0, 0] = np.nan
    result, _ = _select({None: OUT, 16: nan, 32: OUT}, {None: 0.9, 16: 0.1, 32: 0.5})
    assert result.group == 32 and "non-finite" in result.dropped["G=16"]


def test_a_failing_one_head_kernel_keeps_the_default_untimed():
    result, lines = _select({None: RuntimeError("no GPU"), 16: OUT}, {None: 0.5, 16: 0.1})
    assert result.group is None and result.times_ms == {} and "one-head" in result.dropped
    assert lines == ["one-head kernel failed, nothing timed: RuntimeError: no GPU"]
    assert "kept the one-head kernel" in result.describe()


def test_the_budget_skips_candidates_not_yet_started():
    ticks = iter(range(100))
    result, lines = _select({None: OUT, 8: OUT, 16: OUT}, {None: 0.9, 8: 0.5, 16: 0.1}, budget_s=1.5,
                            clock=lambda: float(next(ticks)))
    assert result.group == 8 and "skipped" in result.dropped["G=16"] and lines == [
        "dropped G=16: skipped: the tuning budget of 1.5 s was spent"]


def test_selection_inputs_are_checked():
    with pytest.raises(ValueError, match="start with None"):
        select_group([16, None], None, None)
    with pytest.raises(ValueError, match="at most 4"):
        select_group([None, 1, 2, 4, 8], None, None)


def test_mismatch_tolerances():
    bf = jnp.asarray(OUT, jnp.bfloat16)
    assert mismatch(bf, bf) is None
    assert mismatch(bf + 0.01, bf) is None  # 1% of max |x| = 1: within bf16's 2e-2
    assert "max |diff|" in mismatch(bf + 0.05, bf)
    f32 = jnp.asarray(OUT)
    assert mismatch(f32 + 1e-3, f32) is None and mismatch(f32 + 1e-2, f32) is not None  # f32: 2e-3
    assert "shape" in mismatch(f32[:1], f32)


@pytest.mark.parametrize("kvh,q_per_kv,want", [
    (40, 1, [None, 8, 16, 32]),  # Llama-2-13B: every group distinct (32: groups of 32 + 8)
    (12, 1, [None, 8, 16]),  # 32 runs as 16 over 12 heads (next_pow2): one candidate
    (4, 1, [None, 4]),  # every G runs as 4
    (1, 1, [None, 1]),
    (8, 4, [None]),  # GQA: no variant
])
def test_candidate_groups(kvh, q_per_kv, want):
    got = candidate_groups(kvh, q_per_kv)
    assert got == want and len(got) <= MAX_CANDIDATES


def test_synthetic_batch_shapes_and_contexts():
    q, cache, meta = synthetic_decode_batch(num_seqs=5, num_kv_heads=4, head_dim=16, block_size=8, max_blocks=20,
                                            context=100, cache_dtype=jnp.float8_e4m3fn, q_dtype=jnp.bfloat16, seed=3)
    ctx = np.asarray(meta.context_lens)
    assert q.shape == (5, 4, 16) and q.dtype == jnp.bfloat16 and meta.decode_only
    assert ((ctx >= 50) & (ctx <= 100)).all()
    assert cache.quantized and cache.k.dtype == np.uint8 and cache.k_scale.shape == (1, 4)
    assert len(set(np.asarray(cache.k_scale)[0])) == 4  # a scale per head
    tables = np.asarray(meta.block_tables)
    used = np.concatenate([tables[s, :-(-c // 8)] for s, c in enumerate(ctx)])
    assert len(set(used)) == len(used) and 0 not in used  # distinct pages, block 0 unused
    assert cache.k.shape[1] == len(used) + 1
    assert np.isfinite(np.asarray(jax.lax.bitcast_convert_type(cache.k, jnp.float8_e4m3fn), np.float32)).all()
    assert synthetic_cache_bytes(5, 100, 8, 4, 16, jnp.float8_e4m3fn) >= cache.k.nbytes + cache.v.nbytes


def _wrong_for(bad_group, corrupt):
    """decode_call, except the candidate `bad_group` runs on inputs `corrupt` changed (a wrong kernel)."""
    def make(group, q, cache, metadata, **kw):
        if group == bad_group:
            q, cache, metadata = corrupt(q, cache, metadata)
        return decode_call(group, q, cache, metadata, **kw)
    return make


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float8_e4m3fn"])
def test_tuning_end_to_end_in_interpret_mode(cache_dtype):
    """The real path on a tiny MHA shape (16 kv heads: candidates one-head, G 8, G 16) in interpret mode:
    the one-head kernel's output (the tuner's reference) matches the pure-jnp reference; every variant
    passes the comparison; a deliberately wrong candidate is dropped by it (remove the comparison and
    this fails). bf16: G=8 runs with a wrong logit scale (q x 1.25); fp8: G=16 reads other heads' K scales
    (the synthetic per-head scales are distinct, so that must mismatch)."""
    dtype = jnp.dtype(cache_dtype)
    q, cache, meta = synthetic_decode_batch(num_seqs=3, num_kv_heads=16, head_dim=32, block_size=8, max_blocks=12,
                                            context=64, cache_dtype=dtype, q_dtype=jnp.bfloat16, seed=1)
    attn = dict(sm_scale=0.2, soft_cap=None)
    one = decode_call(None, q, cache, meta, interpret=True, **attn)()
    want = ragged_paged_attention(q, cache, 0, meta, impl="reference", **attn)
    assert mismatch(one, want) is None
    candidates = candidate_groups(16, 1)
    assert candidates == [None, 8, 16]
    lines = []
    good = tune_decode_group(q, cache, meta, candidates, interpret=True, samples=1, log=lines.append, **attn)
    assert lines == [] and not good.dropped and set(good.times_ms) == {"one-head", "G=8", "G=16"}
    assert good.group in candidates

    if dtype == jnp.bfloat16:
        bad, corrupt = 8, lambda q, c, m: (q * 1.25, c, m)  # a kernel with the wrong logit scale
    else:
        bad, corrupt = 16, lambda q, c, m: (q, dataclasses.replace(c, k_scale=c.k_scale[:, ::-1]), m)
    lines = []
    result = tune_decode_group(q, cache, meta, candidates, interpret=True, samples=1, log=lines.append,
                               make_call=_wrong_for(bad, corrupt), **attn)
    assert list(result.dropped) == [f"G={bad}"] and "mismatch" in result.dropped[f"G={bad}"]
    assert result.group != bad and len(lines) == 1 and lines[0].startswith(f"dropped G={bad}: ")
