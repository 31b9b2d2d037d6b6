"""The MHA decode kernel (pallas_kernels/attention/decode_mha.py: G kv heads per program), run with
interpret=True on CPU against the pure-jnp reference, and its switch (mha_group= / JAXLLM_DECODE_MHA_GROUP).

Cases: ragged contexts with padding sequences, shuffled and reversed block tables, kv heads a multiple
of G and not (40 heads, G 16: a last group of 8 real heads), G below 16 (rows padded to the 16-row
tile) and above, forced splits, sliding window + soft cap, fp8 caches (per-row K/V scales), mixed
batches (the single-token sequences through decode_rows), NaN blocks before the window (never read).
Tolerances as test_pk_kernels_interpret.py: fp32 1e-4, bf16 2e-2.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from pallas_kernels.attention import paged_decode_attention, paged_prefill_attention
from pallas_kernels.attention.decode_mha import ENV_VAR, resolve_mha_group
from tests.pallas_kernels.pk_cases import Config, jitted_attention, make_case, to_fp8, valid_tokens

TOL = {"float32": 1e-4, "bfloat16": 2e-2}
KERNEL = "jaxllm_paged_decode_mha"

# (config, options, G, seeds); all q_per_kv 1 (MHA), decode-only
CASES = [
    (Config(6, 6, 300, block_size=16, num_kv_heads=40, q_per_kv=1, head_dim=128, dtype="bfloat16",
            num_layers=1, decode_only=True), {}, 16, 4),
    (Config(8, 8, 200, block_size=8, num_kv_heads=32, q_per_kv=1, decode_only=True), {}, 16, 4),
    (Config(5, 5, 130, block_size=16, num_kv_heads=20, q_per_kv=1, decode_only=True),
     dict(sliding_window=33, soft_cap=4.0), 8, 4),
    (Config(7, 7, 96, block_size=8, num_kv_heads=3, q_per_kv=1, decode_only=True), dict(sm_scale=0.2), 16, 4),
    (Config(4, 4, 64, block_size=8, num_kv_heads=6, q_per_kv=1, dtype="bfloat16", decode_only=True), {}, 2, 4),
    (Config(3, 3, 160, block_size=16, num_kv_heads=48, q_per_kv=1, decode_only=True), {}, 32, 3),
]


def _cid(item):
    cfg, opts, group, _ = item
    return (f"S{cfg.num_seqs}ctx{cfg.max_ctx}bs{cfg.block_size}kv{cfg.num_kv_heads}d{cfg.head_dim}"
            f"{cfg.dtype[:2]}G{group}" + "".join(f"-{k}" for k in opts))


def _decode(group, opts_items):
    """The decode kernel with head group `group`, jitted once per (group, options)."""
    return jitted_attention("pallas_decode", tuple(sorted(opts_items + (("mha_group", group),))))


def _reference(opts_items):
    return jitted_attention("reference", opts_items)


def _assert_close(got, want, case, dtype, msg, scale=1.0):
    ok = valid_tokens(case)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"non-finite output: {msg}"
    np.testing.assert_allclose(got[ok], want[ok], atol=TOL[dtype] * scale, rtol=TOL[dtype],
                               err_msg=f"{msg} ctx={case.ctx}")


@pytest.mark.parametrize("item", CASES, ids=_cid)
def test_mha_decode_kernel_matches_reference(item):
    cfg, opts, group, seeds = item
    key = tuple(sorted(opts.items()))
    kernel, ref = _decode(group, key), _reference(key)
    for seed in range(500, 500 + seeds):
        case = make_case(cfg, seed, reverse_seq=seed % cfg.num_seqs)
        args = (case.q, case.cache, case.layer, case.metadata)
        _assert_close(kernel(*args), ref(*args), case, cfg.dtype, f"G={group} seed={seed}")


def test_mha_decode_kernel_edge_cases():
    """A context an exact multiple of block_size, a single-token context, a trailing padding sequence
    (zeros out), pages in reverse order; 20 heads in groups of 16 (the second group 4 real heads)."""
    cfg = Config(4, 4, 64, block_size=16, num_kv_heads=20, q_per_kv=1, decode_only=True)
    case = make_case(cfg, 7, ctx_override=[64, 1, 32, 0], q_override=[1, 1, 1, 0], reverse_seq=0)
    assert case.tables[0, 0] > case.tables[0, 3]
    args = (case.q, case.cache, case.layer, case.metadata)
    got = np.asarray(_decode(16, ())(*args))
    _assert_close(got, _reference(())(*args), case, cfg.dtype, "edge")
    assert np.all(got[~valid_tokens(case)] == 0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mha_decode_kernel_split_override(num_splits):
    """Forced split counts (1: no split-K; 3: splits that do not divide the table) agree too."""
    cfg = Config(3, 3, 300, block_size=16, num_kv_heads=24, q_per_kv=1, decode_only=True)
    case = make_case(cfg, 11)
    args = (case.q, case.cache, case.layer, case.metadata)
    got = jax.jit(lambda *a: paged_decode_attention(*a, interpret=True, mha_group=16, num_splits=num_splits))(*args)
    _assert_close(got, _reference(())(*args), case, cfg.dtype, f"splits={num_splits}")


@pytest.mark.parametrize("opts", [{}, dict(sliding_window=40, soft_cap=5.0)], ids=["plain", "window_softcap"])
def test_mha_decode_kernel_reads_fp8_cache(opts):
    """fp8 cache (pk_cases.to_fp8: each (layer, kv head) at its own magnitude and scale): the variant
    scales each row by its own head's K scale and V scale; 20 heads so one group is partly padding."""
    cfg = Config(4, 4, 100, block_size=8, num_kv_heads=20, q_per_kv=1, dtype="bfloat16", decode_only=True)
    key = tuple(sorted(opts.items()))
    for seed in range(2):
        case = to_fp8(make_case(cfg, 400 + seed, reverse_seq=seed % cfg.num_seqs), seed)
        assert case.cache.quantized and case.cache.k.dtype == np.uint8
        args = (case.q, case.cache, case.layer, case.metadata)
        want = np.asarray(_reference(key)(*args), np.float32)
        scale = max(1.0, np.abs(want[valid_tokens(case)]).max())
        _assert_close(_decode(16, key)(*args), want, case, cfg.dtype, f"fp8 seed={seed}", scale)


def test_mha_decode_kernel_fp32_queries_over_bf16_cache():
    """q in fp32 over a bf16 cache: q is cast to the cache dtype for the dots, the output stays fp32."""
    cfg = Config(3, 3, 90, block_size=8, num_kv_heads=20, q_per_kv=1, dtype="bfloat16", decode_only=True)
    case = make_case(cfg, 5)
    q32 = case.q.astype(jnp.float32)
    got = _decode(16, ())(q32, case.cache, case.layer, case.metadata)
    assert got.dtype == jnp.float32
    _assert_close(got, _reference(())(q32, case.cache, case.layer, case.metadata), case, "bfloat16", "f32 q")


def test_mha_decode_rows_in_mixed_batches():
    """Mixed batches: the single-token sequences go through decode_rows with mha_group 16, the prompt
    chunks (and a padding sequence) through the prefill kernel; the whole output equals the reference."""
    cfg = Config(6, 48, 200, block_size=8, num_kv_heads=20, q_per_kv=1)
    fn = jax.jit(lambda q, c, layer, m: paged_prefill_attention(q, c, layer, m, interpret=True, mha_group=16))
    for seed in range(600, 603):
        rng = np.random.default_rng(seed)
        q_lens = rng.permutation([1, 20, 1, 1, 0, 7])  # 3 decodes, 2 prompt chunks, 1 padding sequence
        ctx = np.where(q_lens > 0, rng.integers(24, 201, 6), 0)
        case = make_case(cfg, seed, ctx_override=ctx.tolist(), q_override=q_lens.tolist(),
                         reverse_seq=int(np.argmax(ctx)))
        args = (case.q, case.cache, case.layer, case.metadata)
        _assert_close(fn(*args), _reference(())(*args), case, cfg.dtype, f"mixed seed={seed}")


def test_mha_decode_kernel_never_reads_blocks_before_the_window():
    """The hybrid KV cache frees a sliding group's blocks wholly before the window and points their table
    entries elsewhere: here at a NaN block. Output = the reference over the real table."""
    cfg, opts = CASES[2][0], CASES[2][1]
    w, bs = opts["sliding_window"], cfg.block_size
    key = tuple(sorted(opts.items()))
    nulled = 0
    for seed in range(3):
        case = make_case(cfg, seed)
        want = _reference(key)(case.q, case.cache, case.layer, case.metadata)
        poison = jnp.full((cfg.num_layers, 1, bs, cfg.num_kv_heads, cfg.head_dim), jnp.nan, case.cache.k.dtype)
        cache = dataclasses.replace(case.cache, k=jnp.concatenate([case.cache.k, poison], 1),
                                    v=jnp.concatenate([case.cache.v, poison], 1))
        tables = np.array(case.tables)
        for i, c in enumerate(case.ctx):
            first = max(0, int(c) - w) // bs  # blocks wholly before the decode token's window
            tables[i, :first] = case.cache.num_blocks
            nulled += first
        meta = dataclasses.replace(case.metadata, block_tables=jnp.asarray(tables))
        _assert_close(_decode(8, key)(case.q, cache, case.layer, meta), want, case, cfg.dtype, f"seed={seed}")
    assert nulled > 0


# ---- the switch ------------------------------------------------------------------------------------

def test_resolve_mha_group(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_mha_group(None, 1) is None  # default "tune": the engine times; the kernels alone run one-head
    for value, want in [("tune", None), ("TUNE", None), ("off", None), ("0", None), ("auto", 16), ("16", 16),
                        ("1", 1), ("64", 64)]:
        monkeypatch.setenv(ENV_VAR, value)
        assert resolve_mha_group(None, 1) == want, value
        assert resolve_mha_group(None, 4) is None, value  # GQA: always the one-head kernel
    assert resolve_mha_group(32, 1) == 32 and resolve_mha_group("off", 1) is None  # the argument wins
    assert resolve_mha_group(0, 1) is None  # the engine's "one-head kernel, measured" whatever the variable says
    for value in ["12", "128", "-4", "fast"]:
        monkeypatch.setenv(ENV_VAR, value)
        with pytest.raises(ValueError, match=f"{ENV_VAR}='{value}'"):
            resolve_mha_group(None, 1)
    with pytest.raises(ValueError, match="mha_group=24.*power of two in \\[1, 64\\].*got 24"):
        resolve_mha_group(24, 1)


@pytest.mark.parametrize("env,q_per_kv,want", [(None, 1, False), ("tune", 1, False), ("off", 1, False), ("auto", 1, True),
                                               ("16", 1, True), ("16", 2, False)])
def test_environment_selects_the_kernel_at_trace_time(monkeypatch, env, q_per_kv, want):
    """ragged_paged_attention(impl="pallas_decode") traces the MHA kernel exactly when the variable asks
    for it and the model is MHA; otherwise the one-head kernel (the fallback), with the same output."""
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    cfg = Config(3, 3, 64, block_size=8, num_kv_heads=4, q_per_kv=q_per_kv, decode_only=True)
    case = make_case(cfg, 3)
    args = (case.q, case.cache, case.layer, case.metadata)

    def fn(q, c, layer, m):
        return ragged_paged_attention(q, c, layer, m, impl="pallas_decode", interpret=True)

    text = str(jax.make_jaxpr(fn)(*args))
    assert (KERNEL in text) == want, env
    assert ("jaxllm_paged_decode" in text.replace(KERNEL, "")) != want, env  # one kernel or the other
    _assert_close(jax.jit(fn)(*args), _reference(())(*args), case, cfg.dtype, f"env={env}")
