"""4-bit weights held as uint8 two values a byte on the CPU chunked path (jaxllm/models/quant_pack4.py):
the byte layout against an independent construction (GGUF Q4's in-block order), pack/unpack round
trips (numpy and jax), and the packed chunked dot (and the einsum fallback, which unpacks) against x @
the numpy-dequantized weight, on the model's three weight forms and a stacked weight read in place."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.quant import dequantize, pack_int4, quant_einsum, weight_bytes
from jaxllm.models.quant_dot import quant_dot_flat
from jaxllm.models.quant_pack4 import can_pack, pack4, unpack4
from tests.models.test_quant4 import CASES, int4_weight, numpy_weight


def test_byte_layout_is_gguf_in_block_order():
    """Byte j of block g holds row g*B + j (low nibble) and row g*B + B/2 + j (high), as GGUF Q4's
    bytes do; int4 as two's complement nibbles."""
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (64, 3)).astype(np.int8)  # [K=64, N], blocks of 32
    got = np.asarray(pack4(q.astype(jnp.int4), 0, 2))  # [32, 3] uint8
    want = np.zeros((32, 3), np.uint8)
    for g in range(2):
        for j in range(16):
            lo, hi = q[g * 32 + j] & 0xF, q[g * 32 + 16 + j] & 0xF
            want[g * 16 + j] = lo | (hi << 4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(pack4(jnp.asarray(q, jnp.int4), 0, 2, xp=jnp)), want)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
@pytest.mark.parametrize("signed", [True, False], ids=["int4", "uint4"])
def test_pack_unpack_round_trip(xp, signed):
    rng = np.random.default_rng(1)
    shape, axis, nb = (3, 4, 64, 5), -2, 4  # [L, H, D, E]: blocks of 16 along D
    v = rng.integers(-8, 8, shape) if signed else rng.integers(0, 16, shape)
    dt = jnp.int4 if signed else jnp.uint4
    q = v.astype(dt) if xp is np else jnp.asarray(v.astype(np.int8 if signed else np.uint8), dt)
    b = pack4(q, axis, nb, xp)
    assert b.dtype == np.uint8 and b.shape == (3, 4, 32, 5)
    back = unpack4(b, "int4" if signed else "uint4", axis, nb, xp)
    assert np.dtype(back.dtype) == np.dtype(dt)
    np.testing.assert_array_equal(np.asarray(back).astype(np.int8), v.astype(np.int8))
    if xp is np:  # numpy and jax unpack alike
        again = unpack4(jnp.asarray(b), "int4" if signed else "uint4", axis, nb, jnp)
        np.testing.assert_array_equal(np.asarray(again).astype(np.int8), v.astype(np.int8))


def test_can_pack_rules():
    assert can_pack((128, 6, 16), (4, 6, 16)) == -3  # wqkv [E, H, D]: blocks along E
    assert can_pack((4, 64, 96), (4, 2, 96)) == -2  # wo [H, D, E]: along D
    assert can_pack((128, 96), (96,)) is None  # per-channel scales
    assert can_pack((96, 8), (32, 8)) is None  # blocks of 3: odd


@pytest.mark.parametrize("offset", [True, False], ids=["uint4+offset", "int4"])
@pytest.mark.parametrize("case", CASES, ids=["wqkv", "wo", "w_down-g128"])
def test_packed_chunked_dot_matches_numpy_dequantized(case, offset):
    spec, xs, ws, nc, group = case
    w, q, s, m = int4_weight(ws, nc, group, offset, seed=len(ws) + nc)
    p = pack_int4(w)
    assert p.packed == ("uint4" if offset else "int4") and p.q.dtype == jnp.uint8
    assert p.shape == w.shape == ws and p.method == "int4" and p.bits == 4
    assert p.nbytes == w.nbytes == weight_bytes(p) and p.q.size * 2 == q.size
    ref_w = numpy_weight(q, s, m, nc - 1, group)
    np.testing.assert_array_equal(np.asarray(dequantize(p, nc)), ref_w)  # unpacks to the same weight
    wn = jax.tree.map(np.asarray, w)  # numpy q (ml_dtypes int4 / uint4), as a checkpoint's
    np.testing.assert_array_equal(np.asarray(dequantize(pack_int4(wn, np), nc, xp=np)), ref_w)
    np.testing.assert_array_equal(np.asarray(pack_int4(wn, np).q), np.asarray(p.q))
    for t in (1, 3, 40):  # 40: the wide chunks of longer steps, and one dot of both halves (PACK4_ONE_DOT_FROM_T)
        x = np.random.default_rng(t).standard_normal((t,) + xs).astype(np.float32)
        ref = np.einsum(spec, x, ref_w)
        tol = 3e-5 * np.abs(ref).max()
        for chunk in (None, 4096):  # the default chunks, and narrow ones (several loop iterations + tail)
            f = (lambda x, w: quant_einsum(spec, x, w, chunked=True)) if chunk is None else (
                lambda x, w: quant_dot_flat(x, w.q, w.scale, chunk, offset=w.offset, packed=w.packed))
            got = np.asarray(jax.jit(f)(jnp.asarray(x), p))
            np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"chunked T={t} {chunk}")
        got = np.asarray(jax.jit(lambda x, w: quant_einsum(spec, x, w))(jnp.asarray(x), p))  # einsum: unpacked
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"einsum T={t}")


@pytest.mark.parametrize("offset", [True, False], ids=["uint4+offset", "int4"])
def test_packed_chunked_reads_stacked_layer_in_place(offset):
    spec, xs, ws, nc, group = CASES[0]
    w, q, s, m = int4_weight(ws, nc, group, offset, seed=7, lead=(3,))
    p = pack_int4(w)
    assert p.pack_axis == -3 and p[1].packed == p.packed and p[1].shape == ws
    stacked = jax.tree.map(lambda *a: jnp.stack(a), p[0], p[1], p[2])  # the scan loop's stacking
    assert stacked.packed == p.packed and stacked.shape == w.shape
    f = jax.jit(lambda x, w, i: quant_einsum(spec, x, w, chunked=True, layer=i))
    for t in (2, 40):  # 40: the halves meet x in one dot (quant_dot.PACK4_ONE_DOT_FROM_T)
        x = np.random.default_rng(t).standard_normal((t,) + xs).astype(np.float32)
        for i in range(3):
            ref = np.einsum(spec, x, numpy_weight(q[i], s[i], None if m is None else m[i], nc - 1, group))
            got = np.asarray(f(jnp.asarray(x), stacked, jnp.int32(i)))
            np.testing.assert_allclose(got, ref, rtol=0, atol=3e-5 * np.abs(ref).max(), err_msg=f"T={t} layer {i}")


def test_packed_dot_refuses_per_channel_scales():
    from jaxllm.models.quant_dot import chunked_quant_dot

    with pytest.raises(ValueError,
                       match=r"^packed='int4': needs block scales and q \[K/2, N\] = \[32, 8\], got block=None"):
        chunked_quant_dot(jnp.ones((1, 64)), jnp.zeros((32, 8), jnp.uint8), jnp.ones((8,)), packed="int4")
