"""quant_matmul (x @ dequantized int8 / fp8 weight, converted in registers) in interpret mode against
its reference, which dequantizes in f32 and dots at full precision (CUDA lowering: test_pk_lowering.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import quant_matmul, quant_matmul_reference, quant_matmul_supported


def _weight(rng, shape, dtype):
    """Random q in `dtype` (int8 values in [-127, 127]; fp8 from normal values; uint8 = fp8 bits)."""
    if dtype == "int8":
        return jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
    f8 = jnp.asarray(rng.standard_normal(shape) * 8, jnp.float8_e4m3fn)
    return jax.lax.bitcast_convert_type(f8, jnp.uint8) if dtype == "uint8" else f8


def _check(x, q, scale, offset=None, layer=None, tol=1e-4, **kw):
    got = np.asarray(quant_matmul(x, q, scale, offset, layer=layer, interpret=True, **kw), np.float32)
    want = np.asarray(quant_matmul_reference(x, q, scale, offset, layer=layer), np.float32)
    scale_of = np.abs(want).max() + 1e-6
    np.testing.assert_allclose(got / scale_of, want / scale_of, atol=tol, rtol=0)
    return got


@pytest.mark.parametrize("qdtype", ["int8", "float8", "uint8"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (5, 512, 192), (64, 256, 1280), (17, 96, 96), (2, 48, 64)])
def test_per_column_scales_match_reference(qdtype, m, k, n):
    rng = np.random.default_rng(m * 7 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = _weight(rng, (k, n), qdtype)
    scale = jnp.asarray(rng.uniform(0.001, 0.02, n), jnp.float32)
    _check(x, q, scale)


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("with_offset", [False, True])
def test_block_scales_and_offsets_match_reference(block, with_offset):
    rng = np.random.default_rng(block + with_offset)
    m, k, n = 3, 512, 256
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = _weight(rng, (k, n), "int8")
    scale = jnp.asarray(rng.uniform(0.001, 0.02, (k // block, n)), jnp.float16)  # GGUF keeps f16 scales
    offset = jnp.asarray(rng.uniform(-0.1, 0.1, (k // block, n)), jnp.float32) if with_offset else None
    got = _check(x, q, scale, offset)
    # and against a brute-force numpy dequantization (the reference is not its own judge)
    w = np.asarray(q, np.float32).reshape(k // block, block, n) * np.asarray(scale, np.float32)[:, None]
    if with_offset:
        w = w + np.asarray(offset)[:, None]
    np.testing.assert_allclose(got, np.asarray(x) @ w.reshape(k, n), atol=1e-3, rtol=1e-4)


def test_stacked_layer_read_in_place_and_bf16():
    rng = np.random.default_rng(3)
    L, m, k, n = 3, 4, 256, 128
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q = _weight(rng, (L, k, n), "int8")
    scale = jnp.asarray(rng.uniform(0.001, 0.02, (L, n)), jnp.float32)
    for layer in range(L):
        _check(x, q, scale, layer=jnp.int32(layer), tol=1e-2)
    _check(x, q, scale, layer=jnp.int32(2), tol=1e-2, splits=4, block_n=32)


def test_unsupported_inputs_are_refused_with_the_numbers():
    assert not quant_matmul_supported(65, 512, 256, jnp.int8)
    assert not quant_matmul_supported(8, 100, 256, jnp.int8)
    assert quant_matmul_supported(8, 96, 64, jnp.int8)  # K chunks of 32
    assert not quant_matmul_supported(8, 512, 256, jnp.int4)
    assert not quant_matmul_supported(8, 512, 256, jnp.int8, block=8)
    assert not quant_matmul_supported(8, 576, 256, jnp.int8, block=96)  # Triton tiles are powers of two
    assert quant_matmul_supported(64, 5120, 15360, jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="M=65, K=512, N=256"):
        quant_matmul(jnp.zeros((65, 512)), jnp.zeros((512, 256), jnp.int8), jnp.ones(256))
    with pytest.raises(ValueError, match="offset must have"):
        quant_matmul(jnp.zeros((2, 512)), jnp.zeros((512, 256), jnp.int8), jnp.ones(256), jnp.zeros((16, 256)))


@pytest.mark.parametrize("packed", ["int4", "uint4"])
@pytest.mark.parametrize("block,with_offset", [(32, False), (128, True)])
def test_packed_4bit_matches_numpy(packed, block, with_offset):
    """4-bit pairs in uint8 (per block: the first half's rows in the low nibbles), as
    jaxllm/models/quant_pack4.pack4 lays them out, against numpy on the unpacked values."""
    import ml_dtypes

    from jaxllm.models.quant_pack4 import pack4

    rng = np.random.default_rng(block)
    m, k, n = 5, 512, 128
    lo, hi = (-8, 8) if packed == "int4" else (0, 16)
    vals = rng.integers(lo, hi, (k, n))
    q4 = vals.astype(ml_dtypes.int4 if packed == "int4" else ml_dtypes.uint4)
    b = jnp.asarray(pack4(q4, -2, k // block))  # [K/2, N] uint8
    scale = jnp.asarray(rng.uniform(0.001, 0.02, (k // block, n)), jnp.float32)
    offset = jnp.asarray(rng.uniform(-0.1, 0.1, (k // block, n)), jnp.float32) if with_offset else None
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    got = np.asarray(quant_matmul(x, b, scale, offset, packed=packed, interpret=True))
    w = vals.reshape(k // block, block, n) * np.asarray(scale)[:, None]
    if with_offset:
        w = w + np.asarray(offset)[:, None]
    want = np.asarray(x) @ w.reshape(k, n)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)
    ref = np.asarray(quant_matmul_reference(x, b, scale, offset, packed=packed))
    np.testing.assert_allclose(ref, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)
    assert not quant_matmul_supported(m, k, n, jnp.uint8, 16, packed)  # a half-block of 8 rows: no dot
