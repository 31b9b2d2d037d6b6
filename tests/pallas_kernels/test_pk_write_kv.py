"""write_kv: slots land where they should, -1 slots and unrelated slots are untouched, in place."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import KVCache, write_kv


def _random_cache(rng, shape, dtype=jnp.float32):
    return KVCache(jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_scatter_and_skip(dtype):
    rng = np.random.default_rng(0)
    L, NB, bs, kvh, d, T = 3, 7, 4, 2, 8, 9
    cache = _random_cache(rng, (L, NB, bs, kvh, d), dtype)
    slots = np.array([5, -1, 27, 0, -1, 13, 2, 26, -1], np.int32)
    k = jnp.asarray(rng.standard_normal((T, kvh, d)), dtype)
    v = jnp.asarray(rng.standard_normal((T, kvh, d)), dtype)
    out = jax.jit(write_kv)(cache, jnp.int32(1), k, v, jnp.asarray(slots))

    for name, new, src in (("k", out.k, k), ("v", out.v, v)):
        old = np.asarray(getattr(cache, name), np.float32).reshape(L, NB * bs, kvh, d)
        expect = old.copy()
        for t, s in enumerate(slots):
            if s >= 0:
                expect[1, s] = np.asarray(src[t], np.float32)
        got = np.asarray(new, np.float32).reshape(L, NB * bs, kvh, d)
        np.testing.assert_array_equal(got, expect, err_msg=name)  # other layers / slots untouched


def test_write_kv_all_padding_is_noop():
    rng = np.random.default_rng(1)
    cache = _random_cache(rng, (2, 3, 4, 1, 4))
    k = jnp.ones((5, 1, 4))
    out = write_kv(cache, 0, k, k, jnp.full((5,), -1, jnp.int32))
    np.testing.assert_array_equal(np.asarray(out.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(out.v), np.asarray(cache.v))


def test_write_kv_traced_layer_in_scan():
    """The layer index is a traced scalar inside lax.scan over layers, the cache the carry."""
    L, NB, bs, kvh, d, T = 4, 5, 2, 1, 4, 3
    cache = KVCache.zeros(L, NB, bs, kvh, d, jnp.float32)
    slots = jnp.array([3, -1, 8], jnp.int32)

    def step(c, layer):
        val = jnp.full((T, kvh, d), layer + 1, jnp.float32)
        return write_kv(c, layer, val, -val, slots), None

    out, _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(L, dtype=jnp.int32)))(cache)
    got = np.asarray(out.k).reshape(L, NB * bs, kvh, d)
    for layer in range(L):
        np.testing.assert_array_equal(got[layer, [3, 8]], layer + 1)
        assert np.count_nonzero(got[layer]) == 2 * kvh * d
    np.testing.assert_array_equal(np.asarray(out.v), -np.asarray(out.k))


def test_write_kv_donated_is_in_place():
    """With the cache donated, the output reuses the input buffers (no full-cache copy)."""
    cache = KVCache.zeros(2, 64, 16, 2, 32, jnp.float32)
    ptrs = (cache.k.unsafe_buffer_pointer(), cache.v.unsafe_buffer_pointer())
    f = jax.jit(write_kv, donate_argnums=0)
    k = jnp.ones((4, 2, 32))
    out = f(cache, jnp.int32(1), k, k, jnp.array([0, 17, -1, 1000], jnp.int32))
    assert (out.k.unsafe_buffer_pointer(), out.v.unsafe_buffer_pointer()) == ptrs
    hlo = f.lower(out, jnp.int32(0), k, k, jnp.zeros(4, jnp.int32)).compile().as_text()
    assert " copy(" not in hlo and "copy-start" not in hlo


def test_write_kv_shape_error_names_shapes():
    cache = KVCache.zeros(1, 2, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        write_kv(cache, 0, jnp.zeros((3, 1, 8)), jnp.zeros((3, 1, 8)), jnp.zeros(3, jnp.int32))


def test_write_kv_fp8_quantizes_with_first_write_scales_in_place():
    """An fp8 cache: the first write to a layer sets each kv head's scale (HEADROOM x absmax / 448 of
    the valid rows; padding rows ignored), later writes keep it and saturate at +-448 x scale; the
    pages hold the e4m3fn bits of round(row / scale); other layers untouched; donated in place with
    no full-cache copy or convert in the compiled HLO (XLA's CPU fp8 scatter converted the whole cache)."""
    import ml_dtypes

    from pallas_kernels.kv_quant import FP8_MAX, HEADROOM

    L, NB, bs, kvh, d = 2, 64, 16, 2, 32
    cache = KVCache.zeros(L, NB, bs, kvh, d, jnp.float8_e4m3fn)
    assert cache.quantized and cache.k.dtype == jnp.uint8 and cache.k_scale.shape == (L, kvh)
    ptrs = (cache.k.unsafe_buffer_pointer(), cache.v.unsafe_buffer_pointer())
    f = jax.jit(write_kv, donate_argnums=0)
    rng = np.random.default_rng(0)
    k1 = rng.standard_normal((4, kvh, d)).astype(np.float32) * np.array([1.0, 30.0])[None, :, None]
    k1[2] = 1e4  # a padding row: ignored by the scale
    slots1 = np.array([0, 17, -1, 100], np.int32)
    out = f(cache, jnp.int32(1), jnp.asarray(k1), jnp.asarray(-k1), jnp.asarray(slots1))
    want_scale = np.abs(k1[[0, 1, 3]]).max(axis=(0, 2)) * HEADROOM / FP8_MAX  # [kvh]
    np.testing.assert_allclose(np.asarray(out.k_scale[1]), want_scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.v_scale[1]), want_scale, rtol=1e-6)
    assert not np.asarray(out.k_scale[0]).any()  # layer 0 not written: unset
    k2 = np.full((2, kvh, d), 1e6, np.float32)  # far beyond the scale: saturates
    out = f(out, jnp.int32(1), jnp.asarray(k2), jnp.asarray(k2), jnp.asarray([5, 6], np.int32))
    np.testing.assert_allclose(np.asarray(out.k_scale[1]), want_scale, rtol=1e-6)  # unchanged
    pages = np.asarray(out.k).view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(L, NB * bs, kvh, d)
    for t, s in enumerate(slots1):
        if s >= 0:
            want = (k1[t] / want_scale[:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            np.testing.assert_array_equal(pages[1, s], want)
    np.testing.assert_array_equal(pages[1, [5, 6]], FP8_MAX)
    assert np.count_nonzero(pages[0]) == 0
    assert (out.k.unsafe_buffer_pointer(), out.v.unsafe_buffer_pointer()) == ptrs
    hlo = f.lower(out, jnp.int32(0), jnp.asarray(k2), jnp.asarray(k2), jnp.zeros(2, jnp.int32)).compile().as_text()
    page_ops = [ln for ln in hlo.splitlines() if f"[{L},{NB},{bs},{kvh},{d}]" in ln
                and any(op in ln for op in (" copy(", "copy-start", "convert("))]
    assert not page_ops, page_ops  # (the [L, kvh] scales may be copied: 16 bytes)



def test_write_kv_fp8_fixed_scales_match_first_write_path_and_never_move():
    """`scales_fixed` (the engine's cache): a write quantizes with the set scales, bit for bit what
    the first-write path writes once those scales are set, and leaves the scales as they were; the
    flag survives the write, jit and `like`; zeros refuses fixed 0 scales."""
    import ml_dtypes

    L, NB, bs, kvh, d = 2, 8, 4, 2, 16
    rng = np.random.default_rng(1)
    scales = jnp.asarray(rng.uniform(0.01, 0.2, (L, kvh)), jnp.float32)  # [L, kvh] f32
    raw = KVCache.zeros(L, NB, bs, kvh, d, jnp.float8_e4m3fn)
    raw = dataclasses.replace(raw, k_scale=scales, v_scale=2 * scales)  # set: first-write keeps them
    fixed = dataclasses.replace(raw, scales_fixed=True)
    k = (rng.standard_normal((5, kvh, d)) * 20).astype(np.float32)  # some values saturate
    slots = jnp.asarray([0, 9, -1, 31, 1000], jnp.int32)  # padding and out-of-range dropped
    want = jax.jit(write_kv)(raw, jnp.int32(1), jnp.asarray(k), jnp.asarray(-k), slots)
    got = jax.jit(write_kv)(fixed, jnp.int32(1), jnp.asarray(k), jnp.asarray(-k), slots)
    assert got.scales_fixed and not want.scales_fixed
    np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k))
    np.testing.assert_array_equal(np.asarray(got.v), np.asarray(want.v))
    pages = np.asarray(got.k).view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(L, NB * bs, kvh, d)
    s1 = np.asarray(scales[1])[:, None]  # [kvh, 1]
    for t, slot in ((0, 0), (1, 9), (3, 31)):  # numpy: e4m3fn of clip(row / scale, +-448)
        want_row = np.clip(k[t] / s1, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        np.testing.assert_array_equal(pages[1, slot], want_row)
    assert np.abs(k[[0, 1, 3]] / s1).max() > 448  # the saturating case is exercised
    assert np.count_nonzero(pages[0]) == 0 and np.count_nonzero(np.delete(pages[1], [0, 9, 31], axis=0)) == 0
    np.testing.assert_array_equal(np.asarray(got.k_scale), np.asarray(scales))
    np.testing.assert_array_equal(np.asarray(got.v_scale), 2 * np.asarray(scales))
    assert fixed.like(1, 2).scales_fixed and not raw.like(1, 2).scales_fixed
    ones = KVCache.zeros(L, NB, bs, kvh, d, jnp.float8_e4m3fn, scale_init=1.0, scales_fixed=True)
    assert ones.scales_fixed and (np.asarray(ones.k_scale) == 1.0).all()
    with pytest.raises(ValueError, match=r"^scale_init=0.0 is invalid with scales_fixed=True: must be > 0$"):
        KVCache.zeros(L, NB, bs, kvh, d, jnp.float8_e4m3fn, scales_fixed=True)
