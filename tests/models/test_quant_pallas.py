"""Quantized projections through the Pallas quant_matmul (the GPU default for decode-sized steps,
pallas_kernels/matmul/quant.py), run here in interpret mode ($JAXLLM_QUANT_MATMUL=pallas): the same
logits as XLA's dot on the same quantized model (int8 and fp8, both layer loops), every projection of
the tiny model taken by the kernel, and longer steps left to XLA."""
import re

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


@pytest.mark.parametrize("method,layer_loop", [("int8", "unroll"), ("fp8", "unroll"), ("int8", "scan"), ("int4", "unroll")])
def test_pallas_quant_matmul_matches_xla_dot(method, layer_loop, tiny_path, monkeypatch):
    calls = []
    real = projections.quant_matmul
    monkeypatch.setattr(projections, "quant_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 256, n).tolist() for n in (7, 20)]  # 27 tokens: a decode-sized step
    want = _logits(tiny_path, method, layer_loop, "xla", seqs, monkeypatch, calls)
    assert not calls
    got = _logits(tiny_path, method, layer_loop, "pallas", seqs, monkeypatch, calls)
    # wqkv, wo, w_gate_up, w_down per traced layer body (2 layers unrolled, one scan body); int4's wo
    # has groups of head_dim 16 here (packed half-blocks of 8 rows: too short for a dot) and w_down
    # one group of 96 rows (Triton's tiles are powers of two): XLA's dot for those
    per_body = 2 if method == "int4" else 4
    assert len(calls) == per_body * (2 if layer_loop == "unroll" else 1), calls
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


@pytest.mark.parametrize("spec,xs,ws,nc", [("te,ehd->thd", (4, 64), (64, 12, 16), 1),
                                           ("thd,hde->te", (4, 4, 64), (4, 64, 96), 2)])
@pytest.mark.parametrize("packed", ["int4", "uint4"])
def test_projector_packed_4bit(spec, xs, ws, nc, packed, monkeypatch):
    """A 4-bit weight packed two a byte (quant_pack4.py, as the loader holds it for the kernel) through
    the kernel = einsum with the numpy-dequantized weight, with block offsets (AWQ / GPTQ / GGUF Q4_1)."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.quant import QuantWeight, dequantize, pack_int4

    monkeypatch.setenv(projections.QUANT_ENV, "pallas")
    proj = projections.Projector(None, xs[0], None)
    x = jax.random.normal(jax.random.PRNGKey(3), xs)
    lo, hi = (-8, 8) if packed == "int4" else (0, 16)
    q = jax.random.randint(jax.random.PRNGKey(4), ws, lo, hi).astype(jnp.int4 if packed == "int4" else jnp.uint4)
    scale_shape = ws[:nc - 1] + (ws[nc - 1] // 32,) + ws[nc:]
    scales = jax.random.uniform(jax.random.PRNGKey(5), scale_shape, jnp.float32, 0.01, 0.02)
    offsets = jax.random.uniform(jax.random.PRNGKey(6), scale_shape, jnp.float32, -0.1, 0.1)
    w = QuantWeight(q, scales, offsets)
    pw = pack_int4(w)
    assert pw.packed == packed
    ref = np.einsum(spec, np.asarray(x), dequantize(w, nc, xp=np))
    got = proj._pallas_quant(x, pw, None)
    assert got is not None
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert proj._pallas_quant(x, w, None) is None  # unpacked int4: XLA's dot


def test_gpu_layout_packs_4bit_projections_for_the_kernel(tiny_path, monkeypatch):
    """Off the CPU chunked path (a GPU: simulated with quant_dot.ENABLED off) 4-bit projections are held
    packed only where the kernel reads them (JAXLLM_QUANT_MATMUL on), and give XLA's int4 logits."""
    from jaxllm.models import quant_dot
    from jaxllm.models.quant import QuantWeight

    monkeypatch.setattr(quant_dot, "ENABLED", False)
    calls = []
    real = projections.quant_matmul
    monkeypatch.setattr(projections, "quant_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    seqs = [list(range(3, 30))]
    held = {}
    for mode in ("xla", "pallas"):
        monkeypatch.setenv(projections.QUANT_ENV, mode)
        model, c = build(tiny_path, "int4", "unroll")
        w = model.layers[0].arrays()["wqkv"] if hasattr(model.layers[0], "arrays") else None
        held[mode] = w.packed if isinstance(w, QuantWeight) else None
        calls.clear()
        held[mode + "_logits"] = logits_of(model, c, seqs)
        held[mode + "_calls"] = len(calls)
    assert held["xla"] is None and held["pallas"] == "int4", held
    assert held["xla_calls"] == 0 and held["pallas_calls"] == 4
    want = held["xla_logits"]
    np.testing.assert_allclose(held["pallas_logits"], want, atol=2e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_forward_lowers_for_cuda(tiny_path, monkeypatch, method):
    """On a GPU backend (simulated) the quantized forward of a decode-sized step exports for CUDA with
    every projection one Triton kernel (interpret mode does not check Triton's power-of-two tiles)."""
    import warnings

    import jax
    from flax import nnx
    from jax.experimental.pallas import triton as plgpu

    from tests.models.test_quant_fp8_bits import step_inputs
    from tests.pallas_kernels.test_pk_lowering import H100

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(projections.QUANT_ENV, "auto")
    model, c = build(tiny_path, method, "unroll")
    gd, st = nnx.split(model)
    inputs = step_inputs(c)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves((st, *inputs))]
    treedef = jax.tree.structure((st, *inputs))

    def fwd(*leaves):
        st, t, p, cache, m = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(gd, st)(t, p, cache, m)[0]

    triton = [jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)]
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100):
        warnings.simplefilter("ignore", DeprecationWarning)
        text = jax.export.export(jax.jit(fwd), platforms=["cuda"], disabled_checks=triton)(*args).mlir_module()
    # + attention: step_inputs' batch is mixed (prefill_batch), so the decode and the prefill kernel
    assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == 6 * c.num_layers
    assert len(re.findall(r"jaxllm_small_m_matmul", text)) >= 4 * c.num_layers, "each projection its kernel"
