"""4-bit QuantWeights (jaxllm/models/quant.py): int4 / uint4 q with block (group) scales along the
last contracted axis and an optional per-group offset (w = s*q + m). Checked against x @ the
weight dequantized in numpy (an independent expansion: s and m repeated over their groups) on
every path: the einsum path (per-block partial dots, and the dequantized dot of long steps), the
CPU chunked path, and the chunked path reading a stacked weight in place at a layer; and that XLA
holds the 4-bit values packed, two a byte."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.quant import QuantWeight, dequantize, quant_einsum, weight_bytes
from jaxllm.models.quant_dot import quant_dot_flat


def int4_weight(shape, nc, group, offset, seed, lead=()):
    """A random 4-bit weight of `shape` (contracted axes first, `nc` of them), groups of `group`
    along the last contracted axis; `offset`: uint4 q in [0, 15] with f16 offsets (Q4_1 / AWQ),
    else int4 q in [-8, 7] (Q4_0 / symmetric GPTQ)."""
    rng = np.random.default_rng(seed)
    full = lead + shape
    gshape = list(full)
    gshape[len(lead) + nc - 1] //= group
    if offset:
        q = rng.integers(0, 16, full).astype(np.uint8)
        qd = jnp.uint4
    else:
        q = rng.integers(-8, 8, full).astype(np.int8)
        qd = jnp.int4
    s = (rng.random(gshape) * 0.02 + 0.005).astype(np.float16)
    m = (rng.standard_normal(gshape) * 0.05).astype(np.float16) if offset else None
    return QuantWeight(jnp.asarray(q, qd), jnp.asarray(s), None if m is None else jnp.asarray(m)), q, s, m


def numpy_weight(q, s, m, axis, group):
    """The fp32 weight: each group's s (and m) repeated over its `group` rows of `axis`."""
    w = q.astype(np.float32) * np.repeat(s.astype(np.float32), group, axis=axis)
    if m is not None:
        w = w + np.repeat(m.astype(np.float32), group, axis=axis)
    return w


CASES = [  # (spec, x shape without T, weight shape, contracted axes, group)
    ("te,ehd->thd", (128,), (128, 6, 16), 1, 32),
    ("thd,hde->te", (4, 64), (4, 64, 96), 2, 32),  # wo: groups along head_dim
    ("tf,fe->te", (256,), (256, 64), 1, 128),
]


@pytest.mark.parametrize("offset", [True, False], ids=["uint4+offset", "int4"])
@pytest.mark.parametrize("case", CASES, ids=["wqkv", "wo", "w_down-g128"])
def test_int4_paths_match_numpy_dequantized(case, offset):
    spec, xs, ws, nc, group = case
    w, q, s, m = int4_weight(ws, nc, group, offset, seed=len(ws) + nc)
    ref_w = numpy_weight(q, s, m, nc - 1, group)
    np.testing.assert_array_equal(np.asarray(dequantize(w, nc, xp=np)), ref_w)  # numpy side: exact
    np.testing.assert_array_equal(np.asarray(dequantize(w, nc)), ref_w)  # jax side: exact
    for t in (3, 300):  # 3: per-block partial dots; 300: the partial would outgrow q, dequantized dot
        x = np.random.default_rng(t).standard_normal((t,) + xs).astype(np.float32)
        ref = np.einsum(spec, x, ref_w)
        tol = 3e-5 * np.abs(ref).max()
        got = np.asarray(jax.jit(lambda x, w: quant_einsum(spec, x, w))(jnp.asarray(x), w))
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"einsum T={t}")
        got = np.asarray(jax.jit(lambda x, w: quant_dot_flat(x, w.q, w.scale, 4096, offset=w.offset))(
            jnp.asarray(x), w))
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"chunked T={t}")


@pytest.mark.parametrize("offset", [True, False], ids=["uint4+offset", "int4"])
def test_int4_chunked_reads_stacked_layer_in_place(offset):
    """The scan loop's path: q/scale/offset stacked [L, ...], layer picked by a traced index."""
    spec, xs, ws, nc, group = CASES[1]
    w, q, s, m = int4_weight(ws, nc, group, offset, seed=5, lead=(3,))
    x = np.random.default_rng(0).standard_normal((5,) + xs).astype(np.float32)
    f = jax.jit(lambda x, w, i: quant_einsum(spec, x, w, chunked=True, layer=i))
    for i in range(3):
        ref = np.einsum(spec, x, numpy_weight(q[i], s[i], None if m is None else m[i], nc - 1, group))
        got = np.asarray(f(jnp.asarray(x), w, jnp.int32(i)))
        np.testing.assert_allclose(got, ref, rtol=0, atol=3e-5 * np.abs(ref).max(), err_msg=str(i))
        one = w[i]  # per-layer slicing keeps the offset
        assert (one.offset is None) == (not offset) and one.q.shape == ws


def test_int4_is_held_packed_two_a_byte():
    """XLA (CPU here) stores int4 / uint4 device buffers packed; QuantWeight.nbytes counts that, not
    numpy's byte per value (jax's Array.nbytes says size x 1 for int4)."""
    w, q, s, m = int4_weight((256, 512), 1, 32, True, seed=1)
    assert w.q.addressable_shards[0].data.on_device_size_in_bytes() == q.size // 2
    assert w.nbytes == q.size // 2 + s.nbytes + m.nbytes == weight_bytes(w)
    arg = jax.jit(lambda a: a.astype(jnp.float32).sum()).lower(w.q).compile().memory_analysis()
    assert arg.argument_size_in_bytes < 0.6 * q.size
