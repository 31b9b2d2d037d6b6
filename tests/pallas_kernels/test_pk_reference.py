"""The pure-jnp reference against an independent brute-force dense attention (numpy, float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from tests.pallas_kernels.pk_cases import Config, dense_attention, make_case, valid_tokens

CONFIGS = [
    Config(4, 40, 70, block_size=8, num_kv_heads=2, q_per_kv=3),
    Config(6, 6, 90, block_size=16, num_kv_heads=1, q_per_kv=8, decode_only=True),
    Config(3, 64, 300, block_size=32, num_kv_heads=3, q_per_kv=1, head_dim=128),
    Config(8, 8, 40, block_size=8, num_kv_heads=2, q_per_kv=4, decode_only=True, dtype="bfloat16"),
    Config(5, 48, 120, block_size=16, num_kv_heads=2, q_per_kv=4, dtype="bfloat16"),
    Config(2, 160, 400, block_size=16, num_kv_heads=2, q_per_kv=3),  # long q tiles: sequential path
]
OPTIONS = [{}, dict(sliding_window=9), dict(soft_cap=4.0), dict(sm_scale=0.3, sliding_window=1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"S{c.num_seqs}T{c.num_tokens}bs{c.block_size}g{c.q_per_kv}"
                         f"d{c.head_dim}{c.dtype[:2]}{'dec' if c.decode_only else 'mix'}")
def test_reference_matches_dense(cfg):
    tol = 2e-2 if cfg.dtype == "bfloat16" else 2e-5
    opts = OPTIONS[CONFIGS.index(cfg) % len(OPTIONS)]  # one option set per config: one compile
    fn = jax.jit(lambda q, c, layer, m: ragged_paged_attention(q, c, layer, m, impl="reference", **opts))
    for seed in range(2):
        case = make_case(cfg, seed, reverse_seq=seed % cfg.num_seqs)
        out = fn(case.q, case.cache, case.layer, case.metadata)
        assert out.dtype == case.q.dtype and out.shape == case.q.shape
        out = np.asarray(out, np.float64)
        ok = valid_tokens(case)
        np.testing.assert_allclose(out[ok], dense_attention(case, **opts)[ok], atol=tol, rtol=tol,
                                   err_msg=f"seed={seed} opts={opts}")
        assert np.all(out[~ok] == 0), "padding tokens must come out as zeros"


def test_reference_edge_cases():
    """Context an exact multiple of block_size, a single token, a padded-out sequence, reversed pages."""
    cfg = Config(4, 12, 64, block_size=16, num_kv_heads=2, q_per_kv=3)
    case = make_case(cfg, 7, ctx_override=[64, 1, 0, 32], q_override=[3, 1, 0, 8], reverse_seq=0)
    assert case.tables[0, 0] > case.tables[0, 3]
    out = np.asarray(jax.jit(lambda q, c, layer, m: ragged_paged_attention(q, c, layer, m, impl="reference"))(
        case.q, case.cache, case.layer, case.metadata))
    ok = valid_tokens(case)
    np.testing.assert_allclose(out[ok], dense_attention(case)[ok], atol=2e-5, rtol=2e-5)
    assert np.all(out[~ok] == 0)


def test_reference_layer_traced_in_scan():
    """Inside lax.scan over layers the traced layer selects the right cache layer."""
    cfg = Config(3, 3, 50, block_size=8, num_kv_heads=1, q_per_kv=2, decode_only=True, num_layers=3)
    case = make_case(cfg, 3)

    def step(carry, layer):
        return carry, ragged_paged_attention(case.q, case.cache, layer, case.metadata, impl="reference")

    _, outs = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(3, dtype=jnp.int32)))()
    for layer in range(3):
        case.layer = layer
        np.testing.assert_allclose(np.asarray(outs[layer]), dense_attention(case), atol=2e-5, rtol=2e-5)


def test_reference_decode_cost_follows_context_not_table_width():
    """The KV loop runs to the longest context: a wide block table with short contexts stays cheap."""
    cfg = Config(2, 2, 24, block_size=8, num_kv_heads=1, q_per_kv=1, decode_only=True)
    case = make_case(cfg, 0)
    wide = np.full((2, 4096), 10**6, np.int32)
    wide[:, : case.tables.shape[1]] = case.tables
    md = case.metadata.__class__(case.metadata.slot_mapping, jnp.asarray(wide), case.metadata.context_lens,
                                 case.metadata.cu_q_lens, decode_only=True)
    out = ragged_paged_attention(case.q, case.cache, case.layer, md, impl="reference")
    np.testing.assert_allclose(np.asarray(out), dense_attention(case), atol=2e-5, rtol=2e-5)


def test_reference_tile_groups(monkeypatch):
    """Mixed batches attended in several sequential groups of tiles (incl. a padded last group)."""
    import pallas_kernels.attention.reference as reference

    monkeypatch.setattr(reference, "_ROWS_PER_GROUP", 48)  # 3 tiles of 16 rows; 8 tiles
    cfg = Config(6, 50, 150, block_size=8, num_kv_heads=2, q_per_kv=3)
    for seed, opts in enumerate([{}, dict(sliding_window=20)]):
        case = make_case(cfg, 40 + seed, reverse_seq=1)
        out = np.asarray(jax.jit(lambda q, c, layer, m, o=opts: ragged_paged_attention(
            q, c, layer, m, impl="reference", **o))(case.q, case.cache, case.layer, case.metadata))
        ok = valid_tokens(case)
        np.testing.assert_allclose(out[ok], dense_attention(case, **opts)[ok], atol=2e-5, rtol=2e-5)
        assert np.all(out[~ok] == 0)


@pytest.mark.parametrize("opts", [{}, dict(sliding_window=40), dict(soft_cap=5.0)], ids=["plain", "window", "softcap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_decode_uneven_contexts_and_padding(opts, dtype):
    """Decode path (sorted, grouped rows): very uneven contexts (1 token .. 10 chunks, chunk
    multiples), padding sequences at the end, a row count that is not a multiple of the groups."""
    cfg = Config(21, 21, 1300, block_size=16, num_kv_heads=3, q_per_kv=3, decode_only=True, dtype=dtype)
    ctx = [1300, 1, 17, 128, 129, 640, 2, 1000, 5, 256, 3, 1280, 77, 900, 16, 31, 0, 0, 0, 0, 0]
    case = make_case(cfg, 11, ctx_override=ctx, q_override=[int(c > 0) for c in ctx], reverse_seq=0)
    out = np.asarray(jax.jit(lambda q, c, layer, m: ragged_paged_attention(
        q, c, layer, m, impl="reference", **opts))(case.q, case.cache, case.layer, case.metadata), np.float64)
    ok = valid_tokens(case)
    assert ok.sum() == 16
    tol = 2e-2 if dtype == "bfloat16" else 2e-5
    np.testing.assert_allclose(out[ok], dense_attention(case, **opts)[ok], atol=tol, rtol=tol)
    assert np.all(out[~ok] == 0), "padding sequences must come out as zeros"


def test_reference_decode_groups(monkeypatch):
    """Decode rows in one group and in one group per row agree with the dense reference."""
    import pallas_kernels.attention.reference as reference

    cfg = Config(7, 7, 200, block_size=8, num_kv_heads=2, q_per_kv=2, decode_only=True)
    case = make_case(cfg, 5)
    for groups, chunk in ((1, 8), (7, 64), (3, 32)):
        monkeypatch.setattr(reference, "_DECODE_GROUPS", groups)
        monkeypatch.setattr(reference, "_DECODE_CHUNK", chunk)
        out = np.asarray(ragged_paged_attention(case.q, case.cache, case.layer, case.metadata, impl="reference"))
        ok = valid_tokens(case)
        np.testing.assert_allclose(out[ok], dense_attention(case)[ok], atol=2e-5, rtol=2e-5)
        assert np.all(out[~ok] == 0)


@pytest.mark.parametrize("cfg,opts", [
    # a mixed batch: its single-token sequences take the decode path, the others the tile path
    (Config(4, 24, 60, block_size=8, num_kv_heads=2, q_per_kv=3), dict(sliding_window=9, soft_cap=4.0)),
], ids=["mixed"])
def test_reference_reads_fp8_cache(cfg, opts):
    """fp8 pages (uint8 bits) with per-(layer, kv head) scales: the reference equals dense float64
    attention over the dequantized values (the quantization error is the cache's, not the read's)."""
    from tests.pallas_kernels.pk_cases import to_fp8

    fn = jax.jit(lambda q, c, layer, m: ragged_paged_attention(q, c, layer, m, impl="reference", **opts))
    tol = 2e-2 if cfg.dtype == "bfloat16" else 2e-5
    for seed in range(2):
        case = to_fp8(make_case(cfg, seed, reverse_seq=seed % cfg.num_seqs), seed)
        out = np.asarray(fn(case.q, case.cache, case.layer, case.metadata), np.float64)
        ok = valid_tokens(case)
        want = dense_attention(case, **opts)
        np.testing.assert_allclose(out[ok], want[ok], atol=tol * max(1.0, np.abs(want).max()), rtol=tol)
        assert np.all(out[~ok] == 0)
