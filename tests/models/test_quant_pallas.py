"""Quantized projections through the Pallas quant_matmul (the GPU default for decode-sized steps,
pallas_kernels/matmul/quant.py), run here in interpret mode ($JAXLLM_QUANT_MATMUL=pallas): the same
logits as XLA's dot on the same quantized model (int8 and fp8, both layer loops), every projection of
the tiny model taken by the kernel, and longer steps left to XLA."""
import numpy as np
import pytest

from jaxllm.models import projections
from tests.engine_checks import build, logits_of
from tests.models.hf_tiny import make_tiny_hf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf_qpallas")))


def _logits(path, method, layer_loop, mode, seqs, monkeypatch, calls):
    monkeypatch.setenv(projections.QUANT_ENV, mode)
    model, c = build(path, method, layer_loop)
    calls.clear()
    return logits_of(model, c, seqs)


@pytest.mark.parametrize("method,layer_loop", [("int8", "unroll"), ("fp8", "unroll"), ("int8", "scan")])
def test_pallas_quant_matmul_matches_xla_dot(method, layer_loop, tiny_path, monkeypatch):
    calls = []
    real = projections.quant_matmul
    monkeypatch.setattr(projections, "quant_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 256, n).tolist() for n in (7, 20)]  # 27 tokens: a decode-sized step
    want = _logits(tiny_path, method, layer_loop, "xla", seqs, monkeypatch, calls)
    assert not calls
    got = _logits(tiny_path, method, layer_loop, "pallas", seqs, monkeypatch, calls)
    # wqkv, wo, w_gate_up, w_down per traced layer body (2 layers unrolled, one scan body)
    assert len(calls) == (8 if layer_loop == "unroll" else 4), calls
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_steps_longer_than_the_kernel_rows_keep_xla(tiny_path, monkeypatch):
    calls = []
    monkeypatch.setattr(projections, "quant_matmul", lambda *a, **k: calls.append(1))
    _logits(tiny_path, "int8", "unroll", "pallas", [list(range(100))], monkeypatch, calls)  # 100 > MAX_ROWS tokens
    assert not calls


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv(projections.QUANT_ENV, "fast")
    with pytest.raises(ValueError, match="JAXLLM_QUANT_MATMUL='fast' is invalid"):
        projections.pallas_quant_matmul("gpu")
    monkeypatch.setenv(projections.QUANT_ENV, "auto")
    assert projections.pallas_quant_matmul("gpu") and not projections.pallas_quant_matmul("cpu")


@pytest.mark.parametrize("spec,xs,ws,nc", [("te,ehd->thd", (4, 64), (64, 12, 16), 1),
                                           ("thd,hde->te", (4, 4, 32), (4, 32, 96), 2)])
def test_projector_flattens_multi_axis_weights(spec, xs, ws, nc, monkeypatch):
    """The model's multi-axis specs through the kernel = einsum with the numpy-dequantized weight, for
    per-column scales, block scales (blocks of 16 along the last contracted axis) and block offsets."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.quant import QuantWeight, dequantize, quantize

    monkeypatch.setenv(projections.QUANT_ENV, "pallas")
    proj = projections.Projector(None, xs[0], None)
    x = jax.random.normal(jax.random.PRNGKey(3), xs)
    per_channel = quantize(jax.random.normal(jax.random.PRNGKey(4), ws), "int8", nc)
    scale_shape = ws[:nc - 1] + (ws[nc - 1] // 16,) + ws[nc:]
    scales = jax.random.uniform(jax.random.PRNGKey(5), scale_shape, jnp.float32, 0.01, 0.02)
    offsets = jax.random.uniform(jax.random.PRNGKey(6), scale_shape, jnp.float32, -0.1, 0.1)
    for w in (per_channel, QuantWeight(per_channel.q, scales), QuantWeight(per_channel.q, scales, offsets)):
        ref = np.einsum(spec, np.asarray(x), dequantize(w, nc, xp=np))
        got = proj._pallas_quant(x, w, None)
        assert got is not None
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
