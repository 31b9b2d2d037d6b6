"""stacked_matmul (x @ w[layer], w read in place) in interpret mode against its reference (its CUDA
lowering is in test_pk_lowering.py, under the Triton IR verifier)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import stacked_matmul, stacked_matmul_reference, stacked_matmul_supported

# (M, K, N): SmolLM2 q/kv/o/gate/down projections, Llama-2-13B ones (scaled down in K for speed)
SHAPES = [(1, 576, 576), (3, 576, 192), (8, 576, 1536), (64, 1536, 576), (17, 640, 1280), (40, 256, 5120)]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_matches_reference_on_random_cases(dtype, tol):
    rng = np.random.default_rng(0)
    for case in range(12):
        m, k, n = SHAPES[case % len(SHAPES)]
        layers = int(rng.integers(1, 5))
        layer = int(rng.integers(0, layers))
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w = jnp.asarray(rng.standard_normal((layers, k, n)) / np.sqrt(k), dtype)
        got = np.asarray(stacked_matmul(x, w, jnp.int32(layer), interpret=True), np.float32)
        want = np.asarray(stacked_matmul_reference(x, w, layer), np.float32)
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"case {case}: {m}x{k}x{n} layer {layer}")


def test_forced_splits_and_tiles_agree():
    x = jax.random.normal(jax.random.key(0), (5, 512))
    w = jax.random.normal(jax.random.key(1), (2, 512, 256))
    want = np.asarray(stacked_matmul_reference(x, w, 1))
    for kw in [dict(splits=1), dict(splits=8), dict(block_n=32, splits=2), dict(block_k=128)]:
        np.testing.assert_allclose(np.asarray(stacked_matmul(x, w, 1, interpret=True, **kw)), want, atol=1e-4, rtol=1e-4)


def test_unsupported_shapes_are_refused_with_the_numbers():
    assert not stacked_matmul_supported(65, 576, 576)
    assert not stacked_matmul_supported(8, 100, 576)
    with pytest.raises(ValueError, match="M=65, K=576, N=576"):
        stacked_matmul(jnp.zeros((65, 576)), jnp.zeros((1, 576, 576)), 0)
    with pytest.raises(ValueError, match="w must be"):
        stacked_matmul(jnp.zeros((4, 576)), jnp.zeros((576, 576)), 0)
