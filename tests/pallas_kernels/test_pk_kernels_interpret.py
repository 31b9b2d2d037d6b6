"""Every Pallas kernel, run with interpret=True on CPU, against the reference on seeded random cases.

Cases of one config share static shapes (one compile); seeds vary contexts, query lengths, padding
sequences, shuffled block tables (one sequence's pages in reverse order), garbage past each table's
end and stale cache contents. 53 cases for the mixed kernel, 50 for the decode kernel (plus edge cases).
Tolerances (max abs and rel): fp32 1e-4; bf16 2e-2 (bf16 output rounding plus bf16 P @ V).
"""

import jax
import numpy as np
import pytest

from tests.pallas_kernels.pk_cases import Config, jitted_attention, make_case, to_fp8, valid_tokens

TOL = {"float32": 1e-4, "bfloat16": 2e-2}

# (config, options, seeds)
MIXED = [
    (Config(4, 48, 200, block_size=8, num_kv_heads=2, q_per_kv=3), {}, 8),
    (Config(2, 96, 2048, block_size=32, num_kv_heads=1, q_per_kv=4, head_dim=128, dtype="bfloat16"), {}, 8),
    (Config(16, 64, 64, block_size=16, num_kv_heads=2, q_per_kv=8), dict(sliding_window=16), 8),
    (Config(8, 40, 300, block_size=16, num_kv_heads=4, q_per_kv=1, head_dim=128, dtype="bfloat16"),
     dict(soft_cap=3.0), 8),
    (Config(3, 33, 100, block_size=8, num_kv_heads=3, q_per_kv=3, dtype="bfloat16"), {}, 8),
    (Config(6, 24, 512, block_size=32, num_kv_heads=2, q_per_kv=4), dict(sliding_window=40, soft_cap=5.0), 8),
]
DECODE = [
    (Config(16, 16, 2048, block_size=16, num_kv_heads=1, q_per_kv=4, num_layers=1, decode_only=True), {}, 10),
    (Config(5, 5, 300, block_size=8, num_kv_heads=2, q_per_kv=3, dtype="bfloat16", decode_only=True), {}, 10),
    (Config(8, 8, 130, block_size=16, num_kv_heads=2, q_per_kv=8, head_dim=128, decode_only=True), dict(sliding_window=33), 10),
    (Config(1, 1, 2048, block_size=32, num_kv_heads=2, q_per_kv=4, head_dim=128, dtype="bfloat16",
            decode_only=True),
     dict(soft_cap=4.0), 10),
    (Config(12, 12, 64, block_size=8, num_kv_heads=1, q_per_kv=1, decode_only=True), dict(sm_scale=0.2), 10),
]


def _cid(item):
    cfg, opts, _ = item
    return (f"S{cfg.num_seqs}T{cfg.num_tokens}ctx{cfg.max_ctx}bs{cfg.block_size}kv{cfg.num_kv_heads}"
            f"g{cfg.q_per_kv}d{cfg.head_dim}{cfg.dtype[:2]}" + "".join(f"-{k}" for k in opts))


def _check(impl, cfg, opts, seeds, seed_base):
    kernel, ref = jitted_attention(impl, tuple(sorted(opts.items()))), jitted_attention("reference", tuple(sorted(opts.items())))
    tol = TOL[cfg.dtype]
    for seed in range(seed_base, seed_base + seeds):
        case = make_case(cfg, seed, reverse_seq=seed % cfg.num_seqs)
        args = (case.q, case.cache, case.layer, case.metadata)
        got = np.asarray(kernel(*args), np.float32)
        want = np.asarray(ref(*args), np.float32)
        ok = valid_tokens(case)
        assert np.isfinite(got).all(), f"non-finite output, seed {seed}"
        np.testing.assert_allclose(got[ok], want[ok], atol=tol, rtol=tol,
                                   err_msg=f"{impl} seed={seed} ctx={case.ctx} q_lens={case.q_lens}")


@pytest.mark.parametrize("item", MIXED, ids=_cid)
def test_prefill_kernel_mixed_batches(item):
    cfg, opts, seeds = item
    _check("pallas_prefill", cfg, opts, seeds, seed_base=100)


@pytest.mark.parametrize("item", DECODE, ids=_cid)
def test_decode_kernel(item):
    cfg, opts, seeds = item
    _check("pallas_decode", cfg, opts, seeds, seed_base=200)


@pytest.mark.parametrize("item", DECODE[1:2], ids=_cid)
def test_prefill_kernel_on_decode_batches(item):
    cfg, opts, _ = item
    _check("pallas_prefill", cfg, opts, 5, seed_base=300)


@pytest.mark.parametrize("impl", ["pallas_prefill", "pallas_decode"])
def test_kernel_edge_cases(impl):
    """Context an exact multiple of block_size, a single-token context, a padded-out sequence
    (trailing, as decode-only batches require), pages in reverse order."""
    decode = impl == "pallas_decode"
    cfg = Config(4, 4 if decode else 12, 64, block_size=16, num_kv_heads=2, q_per_kv=3, decode_only=decode)
    q_lens = [1, 1, 1, 0] if decode else [3, 1, 8, 0]
    case = make_case(cfg, 7, ctx_override=[64, 1, 32, 0], q_override=q_lens, reverse_seq=0)
    assert case.tables[0, 0] > case.tables[0, 3]
    args = (case.q, case.cache, case.layer, case.metadata)
    got = np.asarray(jitted_attention(impl, ())(*args))
    want = np.asarray(jitted_attention("reference", ())(*args))
    ok = valid_tokens(case)
    np.testing.assert_allclose(got[ok], want[ok], atol=1e-4, rtol=1e-4)
    assert np.all(got[~ok] == 0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_split_override(num_splits):
    """Forced split counts (1: no split-K; 3: splits that do not divide the table) agree too."""
    from pallas_kernels.attention import paged_decode_attention

    cfg = Config(3, 3, 300, block_size=16, num_kv_heads=2, q_per_kv=4, decode_only=True)
    case = make_case(cfg, 11)
    args = (case.q, case.cache, case.layer, case.metadata)
    got = np.asarray(jax.jit(lambda *a: paged_decode_attention(*a, interpret=True, num_splits=num_splits))(*args))
    want = np.asarray(jitted_attention("reference", ())(*args))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["pallas_prefill", "pallas_decode"])
def test_kernel_fp32_queries_over_bf16_cache(impl):
    """q in fp32 over a bf16 cache: q is cast to the cache dtype for the dots, output stays fp32."""
    import jax.numpy as jnp

    cfg = Config(3, 3 if impl == "pallas_decode" else 20, 90, block_size=8, num_kv_heads=1, q_per_kv=4,
                 dtype="bfloat16", decode_only=impl == "pallas_decode")
    case = make_case(cfg, 5)
    q32 = case.q.astype(jnp.float32)
    got = jitted_attention(impl, ())(q32, case.cache, case.layer, case.metadata)
    assert got.dtype == jnp.float32
    want = jitted_attention("reference", ())(q32, case.cache, case.layer, case.metadata)
    ok = valid_tokens(case)
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], atol=2e-2, rtol=2e-2)


# fp8 caches (pk_cases.to_fp8: every (layer, kv head) of K and V at its own magnitude and scale), f32
# or bf16 queries; (impl, config, options). The kernels convert the e4m3 tiles to q's dtype and scale
# per kv head, as the reference does: same tolerances as the q dtype's, relative to the output's size.
FP8 = [
    ("pallas_prefill", Config(3, 24, 80, block_size=8, num_kv_heads=2, q_per_kv=3), dict(sliding_window=40, soft_cap=5.0)),
    ("pallas_decode", Config(4, 4, 100, block_size=8, num_kv_heads=2, q_per_kv=4, dtype="bfloat16",
                             decode_only=True), {}),
]


@pytest.mark.parametrize("item", FP8, ids=lambda it: it[0] + "-" + _cid((it[1], it[2], 0)))
def test_kernels_read_fp8_cache(item):
    impl, cfg, opts = item
    kernel, ref = jitted_attention(impl, tuple(sorted(opts.items()))), jitted_attention("reference", tuple(sorted(opts.items())))
    for seed in range(2):
        case = to_fp8(make_case(cfg, 400 + seed, reverse_seq=seed % cfg.num_seqs), seed)
        assert case.cache.quantized and case.cache.k.dtype == np.uint8
        args = (case.q, case.cache, case.layer, case.metadata)
        got, want = np.asarray(kernel(*args), np.float32), np.asarray(ref(*args), np.float32)
        ok = valid_tokens(case)
        assert np.isfinite(got).all()
        tol = TOL[cfg.dtype] * max(1.0, np.abs(want[ok]).max())
        np.testing.assert_allclose(got[ok], want[ok], atol=tol, rtol=TOL[cfg.dtype], err_msg=f"{impl} seed={seed}")


@pytest.mark.parametrize("impl,item", [("pallas_prefill", MIXED[2]), ("pallas_decode", DECODE[2]),
                                       ("reference", DECODE[2])],
                         ids=lambda x: x if isinstance(x, str) else _cid(x))
def test_null_blocks_before_the_window(impl, item):
    """The hybrid KV cache (jaxllm/core/hybrid_kv_cache_manager.py) frees a sliding group's blocks wholly
    before the window of a sequence's first query and points their table entries at another block. Here that
    block is poison: NaN for the Pallas kernels (they must never read it), huge finite values for the
    reference (which gathers whole chunks and masks; the engine's cache never holds NaN). Output = the
    reference over the real table."""
    import dataclasses

    import jax.numpy as jnp

    cfg, opts, _ = item
    w, bs = opts["sliding_window"], cfg.block_size
    kernel, ref = jitted_attention(impl, tuple(sorted(opts.items()))), jitted_attention("reference", tuple(sorted(opts.items())))
    nulled = 0
    for seed in range(3):
        case = make_case(cfg, seed)
        want = np.asarray(ref(case.q, case.cache, case.layer, case.metadata), np.float32)
        poison_id = case.cache.num_blocks
        poison = jnp.full((cfg.num_layers, 1, bs, cfg.num_kv_heads, cfg.head_dim),
                          jnp.nan if impl != "reference" else 1e4, case.cache.k.dtype)
        cache = dataclasses.replace(case.cache, k=jnp.concatenate([case.cache.k, poison], 1),
                                    v=jnp.concatenate([case.cache.v, poison], 1))
        tables = np.array(case.tables)
        for i, (c, ql) in enumerate(zip(case.ctx, case.q_lens)):
            first = max(0, int(c - ql) - w + 1) // bs if ql > 0 else 0  # first block the first query reads
            tables[i, :first] = poison_id
            nulled += first
        meta = dataclasses.replace(case.metadata, block_tables=jnp.asarray(tables))
        got = np.asarray(kernel(case.q, cache, case.layer, meta), np.float32)
        ok = valid_tokens(case)
        np.testing.assert_allclose(got[ok], want[ok], atol=TOL[cfg.dtype], rtol=TOL[cfg.dtype], err_msg=f"seed={seed}")
    assert nulled > 0


@pytest.mark.parametrize("impl,item", [("pallas_prefill", MIXED[2]), ("pallas_decode", DECODE[2])],
                         ids=lambda x: x if isinstance(x, str) else _cid(x))
def test_null_blocks_of_an_all_sliding_model(impl, item):
    """An all-sliding model (Mistral v0.1: one sliding KV cache group of every layer) gets its one table from the
    hybrid manager: each sequence's earlier tokens allocated as one chunk, then this step's. Its null entries are
    exactly the blocks before the window of the step's first query (the rule above), and with NaN there every
    layer's output is the reference's over the real table: no layer reads a freed block."""
    import dataclasses

    import jax.numpy as jnp

    from jaxllm.core.hybrid_kv_cache_manager import NULL_BLOCK_ID, HybridKVCacheManager
    from jaxllm.core.kv_cache_groups import make_groups
    from jaxllm.core.request import Request
    from jaxllm.sampling_params import SamplingParams

    cfg, opts, _ = item
    w, bs = opts["sliding_window"], cfg.block_size
    kernel, ref = jitted_attention(impl, tuple(sorted(opts.items()))), jitted_attention("reference", tuple(sorted(opts.items())))
    groups = make_groups([w] * cfg.num_layers)
    assert groups.num_groups == 1 and groups.managed
    for seed in range(7, 20):  # the first case with a null entry
        case = make_case(cfg, seed)
        kv = HybridKVCacheManager(cfg.num_seqs * case.tables.shape[1], bs, groups, enable_caching=False)
        poison_id = case.cache.num_blocks
        tables = np.array(case.tables)
        nulled = 0
        for i, (c, ql) in enumerate(zip(case.ctx.tolist(), case.q_lens.tolist())):
            if ql == 0:
                continue
            r = Request(f"s{i}", list(range(c)), SamplingParams(max_tokens=1), seed=0, max_output_tokens=1)
            if c > ql:
                assert kv.allocate_slots(r, c - ql) is not None
                r.num_computed_tokens = c - ql
            assert kv.allocate_slots(r, ql) is not None
            null = [j for j, b in enumerate(kv.get_block_ids(r.request_id)) if b == NULL_BLOCK_ID]
            assert null == list(range(max(0, c - ql - w + 1) // bs))  # the blocks the window of query c - ql skips
            tables[i, null] = poison_id
            nulled += len(null)
        if nulled:
            break
    assert nulled > 0
    poison = jnp.full((cfg.num_layers, 1, bs, cfg.num_kv_heads, cfg.head_dim), jnp.nan, case.cache.k.dtype)
    cache = dataclasses.replace(case.cache, k=jnp.concatenate([case.cache.k, poison], 1),
                                v=jnp.concatenate([case.cache.v, poison], 1))
    meta = dataclasses.replace(case.metadata, block_tables=jnp.asarray(tables))
    ok = valid_tokens(case)
    for layer in range(cfg.num_layers):  # every layer reads the one table
        want = np.asarray(ref(case.q, case.cache, layer, case.metadata), np.float32)
        got = np.asarray(kernel(case.q, cache, layer, meta), np.float32)
        np.testing.assert_allclose(got[ok], want[ok], atol=TOL[cfg.dtype], rtol=TOL[cfg.dtype],
                                   err_msg=f"layer={layer}")


@pytest.mark.parametrize("split_decodes", [False, True])
def test_prefill_kernel_tiles_alone_and_with_decodes_split(split_decodes):
    """Mixed batches with single-token sequences: the prefill kernel with every sequence in tiles
    (split_decodes=False) and with those sequences through the decode kernel both equal the reference."""
    from pallas_kernels.attention.prefill import paged_prefill_attention

    cfg, opts, _ = MIXED[0]
    fn = jax.jit(lambda q, c, layer, m: paged_prefill_attention(q, c, layer, m, interpret=True,
                                                                 split_decodes=split_decodes, **opts))
    ref = jitted_attention("reference", tuple(sorted(opts.items())))
    singles = 0
    for seed in range(400, 403):
        case = make_case(cfg, seed, reverse_seq=seed % cfg.num_seqs)
        singles += int(np.sum(np.asarray(case.q_lens) == 1))
        args = (case.q, case.cache, case.layer, case.metadata)
        ok = valid_tokens(case)
        np.testing.assert_allclose(np.asarray(fn(*args), np.float32)[ok], np.asarray(ref(*args), np.float32)[ok],
                                   atol=TOL[cfg.dtype], rtol=TOL[cfg.dtype], err_msg=f"seed {seed}")
    assert singles > 0, "no single-token sequence: the split is not exercised"
