"""Full-precision projections of the CPU layer scan read in place (jaxllm/models/stacked_dot.py):
values against numpy, the tiny llama's logits against the scan's own slice-and-dot path (the switch
off), and its optimized HLO: with the switch on no array of one layer's weight size is made in the
step (the scan's per-layer weight copies are gone), with it off they are there (the check can fail)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import stacked_dot
from jaxllm.models.quant import QUANT_PARAMS
from jaxllm.models.stacked_dot import chunk_rows, stacked_dot as sdot, stacked_einsum
from tests.engine_checks import build, logits_of

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the in-place stacked dot is the CPU path")


def test_chunk_rows():
    assert chunk_rows(576, 3072, 4, 2 << 20) == 144  # 170 rows asked: the divisor 144 of 576
    assert chunk_rows(1536, 576, 4, 2 << 20) == 768  # at most half the rows: never the whole weight
    assert chunk_rows(576, 960, 2, 64 * 1024) == 32  # bf16: 34 rows asked -> 32
    assert chunk_rows(12, 64, 4, 1 << 20) == 12  # under 2 * MIN_ROWS rows: one block
    assert chunk_rows(4096, 4096, 4, 1024) == stacked_dot.MIN_ROWS


def test_use_stacked_dot(monkeypatch):
    """On: CPU, one device, steps of <= MAX_TOKENS tokens ("auto") or any ("rows"); off with "xla",
    under tensor parallelism (a layout) and on any other backend; a bad value is refused by name."""
    use = stacked_dot.use_stacked_dot
    monkeypatch.delenv(stacked_dot.ENV, raising=False)
    assert use(1, None) and use(stacked_dot.MAX_TOKENS, None) and not use(stacked_dot.MAX_TOKENS + 1, None)
    assert not use(8, object())  # a TPLayout
    monkeypatch.setenv(stacked_dot.ENV, "rows")
    assert use(4096, None) and not use(8, object())
    monkeypatch.setenv(stacked_dot.ENV, "xla")
    assert not use(1, None)
    monkeypatch.setenv(stacked_dot.ENV, "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not use(1, None)
    monkeypatch.setenv(stacked_dot.ENV, "on")
    with pytest.raises(ValueError, match="JAXLLM_CPU_STACKED_DOT='on' is invalid"):
        use(1, None)


@pytest.mark.parametrize("t,k,n,dtype", [(1, 96, 40, np.float32), (5, 576, 200, np.float32),
                                         (64, 256, 96, np.float32), (3, 128, 64, jnp.bfloat16)])
def test_stacked_dot_equals_matmul(t, k, n, dtype):
    """Several row blocks, read from the stacked [L, K, N] weight at a traced layer = x @ w[layer] in numpy (f64)."""
    rng = np.random.default_rng(t)
    x = jnp.asarray(rng.standard_normal((t, k)), dtype)
    w = jnp.asarray(rng.standard_normal((3, k, n)), dtype)
    cb = 16 * n * jnp.dtype(dtype).itemsize  # 16-row blocks
    assert chunk_rows(k, n, jnp.dtype(dtype).itemsize, cb) < k  # really blocked
    f = jax.jit(lambda x, w, i: sdot(x, w, i, cb))
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    for i in (2, 0):
        got = np.asarray(f(x, w, jnp.int32(i)))
        assert got.dtype == np.float32
        ref = xf @ wf[i]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("spec,xs,ws", [("te,ehd->thd", (4, 64), (2, 64, 12, 16)),
                                        ("thd,hde->te", (4, 4, 16), (2, 4, 16, 96))])
def test_stacked_einsum_multi_axis(spec, xs, ws):
    """The model's multi-axis specs: = einsum with the layer's weight, in x's dtype."""
    x = jax.random.normal(jax.random.PRNGKey(0), xs)
    w = jax.random.normal(jax.random.PRNGKey(1), ws)
    got = jax.jit(stacked_einsum)(x, w, jnp.int32(1))
    ref = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w[1], np.float64))
    assert got.dtype == x.dtype and got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def weight_shapes(shape: tuple[int, ...], nc: int) -> set[tuple[int, ...]]:
    """The shapes a copy of one layer's weight (per-layer `shape`, `nc` contracted axes) takes in
    the HLO: its own axes in any order (XLA copied wo transposed), its [K, N] flattening, each also
    with a leading 1 (a dynamic-slice of the stacked array before the bitcast)."""
    import itertools
    import math

    flat = (math.prod(shape[:nc]), math.prod(shape[nc:]))
    out = set(itertools.permutations(shape)) | {flat, flat[::-1]}
    return out | {(1,) + s for s in out}


def weight_sized_arrays(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """Instructions of the optimized HLO that make a float array of a layer weight's shape (a copy of
    a layer's slice: fusion, copy, dynamic-slice, ...); parameters, tuple plumbing and bitcasts (no
    bytes written) excluded."""
    out = []
    for m in re.finditer(r"%\S+ = (f32|bf16|f16)\[([\d,]*)\]\{[^}]*\} (\S+)\(", hlo):
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        if m.group(3) not in ("parameter", "get-tuple-element", "tuple", "bitcast") and dims in shapes:
            out.append(m.group(0))
    return out


def test_tiny_model_in_place_equals_slices_and_copies_no_weight(tmp_path_factory, monkeypatch):
    """The tiny llama (scan loop, f32): logits with the projections read in place equal the scan's
    slice-and-dot (JAXLLM_CPU_STACKED_DOT=xla) within f32 tolerance, for a decode-sized batch and a
    prefill of more than MAX_TOKENS tokens (which keeps XLA's dot); the decode-sized step's
    optimized HLO makes no array of a layer weight's size with the switch on, and one per weight
    (4) with it off."""
    from flax import nnx

    from jaxllm.models.dense_batch import prefill_batch
    from pallas_kernels import KVCache
    from tests.models.hf_tiny import make_tiny_hf

    path = make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf_sdot")))
    model, c = build(path, None, "scan")
    assert model.layer_loop == "scan"
    small = [[3, 1, 4, 1, 5], list(range(7, 40))]  # 38 tokens: the in-place path
    big = [list(range(1, 70))]  # 69 tokens: > MAX_TOKENS, XLA's dot either way
    got = {}
    for m in ("xla", "auto"):
        monkeypatch.setenv(stacked_dot.ENV, m)
        got[m] = [logits_of(model, c, s) for s in (small, big)]
    for a, b in zip(got["auto"], got["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

    shapes = set()
    for n, v in model.layers.arrays().items():
        if f"layers.{n}" in QUANT_PARAMS:  # the four projections, nc contracted axes each
            shapes |= weight_shapes(v.shape[1:], QUANT_PARAMS[f"layers.{n}"])
    gd, st = nnx.split(model)
    tokens, positions, meta, nb = prefill_batch([[5], [6], [7]], 16)
    cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
    found = {}
    for m in ("xla", "auto"):
        monkeypatch.setenv(stacked_dot.ENV, m)
        hlo = jax.jit(lambda st, t, p, cache, md: nnx.merge(gd, st)(t, p, cache, md)[0]).lower(
            st, tokens, positions, cache, meta).compile().as_text()
        assert "while" in hlo
        found[m] = weight_sized_arrays(hlo, shapes)
    print(found)
    assert len(found["xla"]) >= 4, found["xla"]  # the scan's copies of each layer's slice: the check can fail
    assert found["auto"] == [], found["auto"]
