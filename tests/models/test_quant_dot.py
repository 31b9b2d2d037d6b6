"""The column-chunked quantized matmul (jaxllm/models/quant_dot.py): values against a numpy
dequantize-then-matmul reference, and the acceptance check of issue 17 on CPU: no full-precision
(f32/f16) array of a weight's shape in the optimized HLO, and temp bytes well below one weight in f32."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import quant_dot
from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize, quant_einsum, quantize
from jaxllm.models.quant_dot import chunk_cols, chunked_quant_dot
from tests.engine_checks import build, logits_of

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunked dot is the CPU path")


def block_weight(k, n, block, seed):
    """A Q8_0-like QuantWeight: int8 q [k, n], f16 scales [k / block, n]."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    s = (rng.random((k // block, n)) * 0.02 + 0.001).astype(np.float16)
    return QuantWeight(jnp.asarray(q), jnp.asarray(s))


def test_chunk_cols():
    assert chunk_cols(576, 3072, 4, 512 * 1024) == 192  # 227 columns asked: the divisor 192 of 3072
    assert chunk_cols(576, 960, 4, 512 * 1024) == 192
    assert chunk_cols(64, 200, 4, 64 * 4 * 70) == 50  # the largest divisor of 200 in [35, 70]
    assert chunk_cols(64, 211, 4, 64 * 4 * 70) == 70  # 211 is prime: a tail chunk
    assert chunk_cols(13824, 5120, 4, 512 * 1024) == quant_dot.MIN_COLS
    assert chunk_cols(64, 50, 4, 1 << 20) == 50  # narrower than 2 * MIN_COLS: one chunk
    assert chunk_cols(576, 576, 4, 2 << 20) == 288  # never the whole weight (SmolLM2's wo at 2 MiB)


@pytest.mark.parametrize("kind,t,n", [("int8", 1, 3072), ("int8", 37, 1000), ("fp8", 5, 640), ("q8_0", 3, 1000),
                                      ("q8_0", 70, 512)])
def test_chunked_equals_dequantized_matmul(kind, t, n):
    """Several chunks (and a tail when n has no divisor near the chunk) against x @ dequantize(w) in numpy."""
    k = 256
    x = np.random.default_rng(1).standard_normal((t, k)).astype(np.float32)
    if kind == "q8_0":
        w = block_weight(k, n, 32, 2)
        ref_w = dequantize(w, 1, xp=np)
    else:
        w = quantize(jax.random.normal(jax.random.PRNGKey(0), (k, n)), kind, 1)
        ref_w = dequantize(w, 1, xp=np)
    ref = x @ ref_w
    ch = chunk_cols(k, n, 4, 64 * 1024)
    assert ch < n  # really chunked
    got = np.asarray(chunked_quant_dot(jnp.asarray(x), w.q, w.scale, 32 if kind == "q8_0" else None, 64 * 1024))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("spec,xs,ws,nc", [("te,ehd->thd", (4, 64), (64, 12, 16), 1),
                                           ("thd,hde->te", (4, 4, 16), (4, 16, 96), 2)])
def test_quant_einsum_chunked_multi_axis(spec, xs, ws, nc, monkeypatch):
    """quant_einsum(chunked=True) on the model's multi-axis specs = einsum with the dequantized
    weight, for per-channel and block scales (the block axis is the last contracted one)."""
    monkeypatch.setattr(quant_dot, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(quant_dot, "MIN_COLS", 16)
    x = jax.random.normal(jax.random.PRNGKey(3), xs)
    per_channel = quantize(jax.random.normal(jax.random.PRNGKey(4), ws), "int8", nc)
    scale_shape = ws[:nc - 1] + (ws[nc - 1] // 8,) + ws[nc:]  # blocks of 8 along the last contracted axis
    blocks = QuantWeight(per_channel.q, jax.random.uniform(jax.random.PRNGKey(5), scale_shape, jnp.float32, 0.01, 0.02))
    for w in (per_channel, blocks):
        ref = np.einsum(spec, np.asarray(x), dequantize(w, nc, xp=np))
        got = np.asarray(quant_einsum(spec, x, w, chunked=True))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def float_arrays(hlo: str) -> set[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every f32/f16/bf16 value an instruction produces (parameters excluded)."""
    out = set()
    for m in re.finditer(r"= (f32|f16|bf16)\[([\d,]*)\]\{[^}]*\} (\S+)\(", hlo):
        if m.group(3) != "parameter":
            out.add((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
    return out


@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8-bits", "q8_0"])
def test_smollm2_projection_has_no_full_precision_weight(kind):
    """The acceptance check at SmolLM2-135M's w_gate_up shape [576, 3072], one decode token: the plain
    dot converts the whole weight (a [576, 3072] f32/f16 array, temp >= the f32 weight); the chunked
    one leaves no array of the weight's shape and needs under 1/8 of it in temp bytes. fp8 held as
    float8_e4m3fn: plus one 8-bit copy (XLA CPU's float8 -> uint8 bitcast is a copy; measured 2.1 MiB),
    asserted present; fp8 held as its uint8 bits (the model's form on CPU): no copy (int8 0.44 MiB)."""
    k, n = 576, 3072
    x = jnp.ones((1, k), jnp.float32)
    w = block_weight(k, n, 32, 0) if kind == "q8_0" else quantize(
        jnp.ones((k, n)), kind.removesuffix("-bits"), 1, fp8_bits=kind.endswith("-bits"))
    f32_weight = k * n * 4
    found = {}
    for chunked in (False, True):
        c = jax.jit(lambda x, w, ch=chunked: quant_einsum("te,ef->tf", x, w, chunked=ch)).lower(x, w).compile()
        weight_shaped = {a for a in float_arrays(c.as_text()) if a[1] in ((k, n), (k // 32, 32, n))}
        found[chunked] = (weight_shaped, c.memory_analysis().temp_size_in_bytes)
    print(kind, found)
    assert found[False][0] and found[False][1] >= f32_weight // 2  # the check can fail: the plain dot trips it
    assert not found[True][0], found[True][0]
    assert found[True][1] < f32_weight // 8 + (k * n if kind == "fp8" else 0)
    if kind == "fp8":  # the 8-bit copy the bits avoid is really there
        assert found[True][1] >= k * n
    if kind == "fp8-bits":
        written = re.findall(rf"= u8\[{k},{n}\]\{{[^}}]*\}} (\S+)\(", c.as_text())
        assert set(written) <= {"parameter", "get-tuple-element", "tuple", "bitcast"}, written  # no u8 copy


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_tiny_model_chunked_equals_plain_and_no_weight_copy(method, tmp_path_factory, monkeypatch):
    """The tiny llama (scan loop) with chunks small enough that every projection loops: logits equal
    the plain dot's (same quantized weights), and the jitted forward's optimized HLO holds no float
    array of a held weight's shape, per layer or stacked (fp8 included: its weights cross the layer
    loop as uint8 bits, else XLA CPU widens them to f16 whole before the loop)."""
    from flax import nnx

    from jaxllm.models.dense_batch import prefill_batch
    from pallas_kernels import KVCache
    from tests.models.hf_tiny import make_tiny_hf

    path = make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf_qdot")))
    model, c = build(path, method, "scan")
    seqs = [[3, 1, 4, 1, 5], list(range(7, 40))]
    monkeypatch.setattr(quant_dot, "ENABLED", False)
    plain = logits_of(model, c, seqs)
    monkeypatch.setattr(quant_dot, "ENABLED", True)
    monkeypatch.setattr(quant_dot, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(quant_dot, "MIN_COLS", 16)
    got = logits_of(model, c, seqs)
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())

    held = {k: v for k, v in model.layers.arrays().items() if isinstance(v, QuantWeight)}
    assert len(held) == 4
    shapes = set()
    for name, v in held.items():
        lq, nc = v.q.shape, QUANT_PARAMS[f"layers.{name}"]  # [L, in..., out...], nc contracted axes
        kk, nn = int(np.prod(lq[1:1 + nc])), int(np.prod(lq[1 + nc:]))
        shapes |= {lq, lq[1:], (kk, nn), (lq[0], kk, nn)}
    gd, st = nnx.split(model)
    tokens, positions, meta, nb = prefill_batch([[5], [6], [7]], 16)
    cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
    hlo = jax.jit(lambda st, t, p, cache, m: nnx.merge(gd, st)(t, p, cache, m)[0]).lower(
        st, tokens, positions, cache, meta).compile().as_text()
    bad = {a for a in float_arrays(hlo) if a[1] in shapes}
    assert not bad, bad
    assert "while" in hlo and re.search(r"s8\[|u8\[", hlo)


@pytest.mark.parametrize("kind", ["int8", "q8_0"])
def test_stacked_layer_read_in_place(kind):
    """`layer` (traced, as in the scan loop): each chunk sliced from the stacked [L, K, N] weight at
    that layer, tail chunk included (N = 211 is prime) = x @ dequantize(that layer's weight)."""
    k, n, layers = 128, 211, 3
    x = np.random.default_rng(4).standard_normal((2, k)).astype(np.float32)
    if kind == "q8_0":
        ws = [block_weight(k, n, 32, s) for s in range(layers)]
    else:
        ws = [quantize(jax.random.normal(jax.random.PRNGKey(s), (k, n)), "int8", 1) for s in range(layers)]
    stacked = QuantWeight(jnp.stack([w.q for w in ws]), jnp.stack([w.scale for w in ws]))
    f = jax.jit(lambda x, w, i: chunked_quant_dot(x, w.q, w.scale, 32 if kind == "q8_0" else None, 16 * 1024, i))
    assert chunk_cols(k, n, 4, 16 * 1024) * 2 < n and n % chunk_cols(k, n, 4, 16 * 1024)  # chunks and a tail
    for i in (2, 0):
        ref = x @ dequantize(ws[i], 1, xp=np)
        got = np.asarray(f(jnp.asarray(x), stacked, jnp.int32(i)))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
