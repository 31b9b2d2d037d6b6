"""fp8 weights held as their uint8 bits where the chunked dot runs (CPU, one device), float8_e4m3fn
elsewhere (jaxllm/models/quant_dot.py, `holds_fp8_bits`): the bits read back as the same values, the
CPU step copies no quantized weight, the scan slices no weight the Projector reads in place, and the
GPU lowering keeps float8 weights and the plain dot."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxllm.models import quant_dot
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize, quantize
from pallas_kernels import KVCache
from tests.models.hf_tiny import make_tiny_hf
from tests.engine_checks import build, logits_of

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bits are the CPU path's held form")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf_fp8bits")))


def step_inputs(c, seqs=((5,), (6,), (7,))):
    tokens, positions, meta, nb = prefill_batch([list(s) for s in seqs], 16)
    cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
    return tokens, positions, cache, meta


def held_quant(model) -> list[tuple[str, QuantWeight]]:
    """(name, weight) of every held quantized weight: stacked [L, ...] (scan) or one per layer (unroll)."""
    layers = [model.layers] if model.layer_loop == "scan" else list(model.layers)
    return [(n, v) for lw in layers for n, v in lw.arrays().items() if isinstance(v, QuantWeight)]


def weight_shapes(model) -> set[tuple[int, ...]]:
    """Every shape a held quantized weight has: as held, per layer, flattened [K, N] (and [L, K, N])."""
    lead = 1 if model.layer_loop == "scan" else 0
    shapes = set()
    for name, v in held_quant(model):
        s, nc = v.q.shape, QUANT_PARAMS[f"layers.{name}"]
        k, n = int(np.prod(s[lead:lead + nc])), int(np.prod(s[lead + nc:]))
        shapes |= {s, s[lead:], (k, n), s[:lead] + (k, n)}
    return shapes


def written_8bit(hlo: str, shapes) -> set[str]:
    """8-bit arrays of a weight's shape that an instruction writes (not a parameter, bitcast or tuple
    element): copies of quantized weights."""
    found = re.finditer(r"(\S+) = (s8|u8|f8e4m3fn)\[([\d,]+)\]\{[^}]*\} (\S+)\(", hlo)
    return {f"{m.group(1)} {m.group(2)}[{m.group(3)}] {m.group(4)}" for m in found
            if m.group(4) not in ("parameter", "bitcast", "get-tuple-element", "tuple")
            and tuple(int(d) for d in m.group(3).split(",")) in shapes}


def test_bits_dequantize_to_the_float8_values():
    """quantize(fp8_bits=True) = the float8 q's bits (numpy's own view), and dequantize (jnp and numpy)
    reads them back as the same values."""
    w = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 24), jnp.float32)
    f8, bits = quantize(w, "fp8", 1, stacked=True), quantize(w, "fp8", 1, stacked=True, fp8_bits=True)
    assert f8.q.dtype == jnp.float8_e4m3fn and bits.q.dtype == jnp.uint8
    assert f8.method == bits.method == "fp8" and quantize(w, "int8", 1, stacked=True).method == "int8"
    np.testing.assert_array_equal(np.asarray(bits.q), np.asarray(f8.q).view(np.uint8))
    ref = np.asarray(f8.q).astype(np.float32) * np.asarray(f8.scale)[:, None, :]
    assert np.abs(ref).max() > 0.1
    np.testing.assert_array_equal(np.asarray(dequantize(bits, 1, stacked=True)), ref)
    host = QuantWeight(np.asarray(bits.q), np.asarray(bits.scale))
    np.testing.assert_array_equal(dequantize(host, 1, stacked=True, xp=np), ref)
    assert host.q.view(ml_dtypes.float8_e4m3fn).dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("how", ["astype", "bits", "lut"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_bits_to_float_all_256_codes(how, dtype):
    """Every uint8 code (as a [16, 16] chunk, jitted as in the dot) converts to ml_dtypes' own
    float8_e4m3fn value in `dtype`, bit for bit (signed zeros and the subnormals included); 0x7F/0xFF → NaN."""
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32).astype(dtype)  # [16, 16]
    got = np.asarray(jax.jit(lambda b: quant_dot.fp8_bits_to_float(b, dtype, how))(jnp.asarray(codes)))
    assert got.dtype == ref.dtype
    nan = np.isnan(ref.astype(np.float32))
    assert sorted(codes[nan].tolist()) == [0x7F, 0xFF] and np.isnan(got.astype(np.float32)[nan]).all()
    bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
    np.testing.assert_array_equal(got[~nan].view(bits), ref[~nan].view(bits))
    assert (ref[~nan] != 0).sum() == 252 and np.abs(ref[~nan].astype(np.float32)).min() == 0  # subnormals, +-0, 448


@pytest.mark.parametrize("how,copy", [("bits", True), ("bits", False), ("lut", True), ("astype", True)])
def test_chunked_dot_same_with_each_fp8_convert(how, copy, monkeypatch):
    """The chunked dot over held fp8 bits (per-channel and block scales, a tail chunk) gives the same
    f32 result with each FP8_CONVERT and FP8_CHUNK_COPY as with the float8 astype of the uncopied slice."""
    w = jax.random.normal(jax.random.PRNGKey(3), (64, 200), jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 64), jnp.float32)
    qw = quantize(w, "fp8", 1, fp8_bits=True)  # q [64, 200] uint8 bits
    qf = np.asarray(qw.q).view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # [64, 200]
    blocks = np.asarray(jax.random.uniform(jax.random.PRNGKey(5), (2, 200), jnp.float32, 0.5, 2.0))  # [64/32, 200]
    for block, s, deq in ((None, qw.scale, qf * np.asarray(qw.scale)), (32, blocks, qf * np.repeat(blocks, 32, 0))):
        monkeypatch.setattr(quant_dot, "FP8_CONVERT", "astype")
        monkeypatch.setattr(quant_dot, "FP8_CHUNK_COPY", False)
        ref = quant_dot.chunked_quant_dot(x, qw.q, s, block, chunk_bytes=64 * 4 * 64)  # 64-col chunks, a tail
        monkeypatch.setattr(quant_dot, "FP8_CONVERT", how)
        monkeypatch.setattr(quant_dot, "FP8_CHUNK_COPY", copy)
        got = quant_dot.chunked_quant_dot(x, qw.q, s, block, chunk_bytes=64 * 4 * 64)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ deq, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="FP8_CONVERT='f16'"):
        quant_dot.fp8_bits_to_float(qw.q, jnp.float32, "f16")


@pytest.mark.parametrize("layer_loop", ["scan", "unroll"])
def test_cpu_step_copies_no_fp8_weight(layer_loop, tiny_path, monkeypatch):
    """The tiny llama with fp8 weights (chunks small enough that every projection loops): held as uint8
    bits, logits equal to the same model held as float8_e4m3fn (the per-step bitcast path) and to the
    plain dot's; the jitted step writes no 8-bit array of a held weight's shape, while the float8-held
    model's step does (`wrapped_bitcast-convert`: the check can fail)."""
    monkeypatch.setattr(quant_dot, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(quant_dot, "MIN_COLS", 16)
    seqs = [[3, 1, 4, 1, 5], list(range(7, 40))]
    models, logits, copies = {}, {}, {}
    for held in ("bits", "f8"):
        monkeypatch.setattr(quant_dot, "HOLD_FP8_BITS", held == "bits")
        model, c = build(tiny_path, "fp8", layer_loop)
        dtypes = {v.q.dtype for _, v in held_quant(model)}
        assert dtypes == {jnp.dtype(jnp.uint8 if held == "bits" else jnp.float8_e4m3fn)}
        assert model.quantization == "fp8"
        logits[held] = logits_of(model, c, seqs)
        gd, st = nnx.split(model)
        hlo = jax.jit(lambda st, t, p, cache, m, gd=gd: nnx.merge(gd, st)(t, p, cache, m)[0]).lower(
            st, *step_inputs(c)).compile().as_text()
        copies[held] = written_8bit(hlo, weight_shapes(model))
        models[held] = (model, c)
    np.testing.assert_array_equal(logits["bits"], logits["f8"])
    monkeypatch.setattr(quant_dot, "ENABLED", False)
    plain = logits_of(*models["bits"], seqs)  # the plain dot reads the bits as float8 too
    np.testing.assert_allclose(logits["bits"], plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    print(copies)
    assert copies["f8"], "the float8-held step should copy its weights to uint8 (else this check is void)"
    assert not copies["bits"], copies["bits"]


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_scan_does_not_slice_weights_read_in_place(method, tiny_path):
    """Scan loop, chunked dot: the quantized weights reach the layer scan once (loop constants), not as
    scan xs sliced per layer; the scan's xs are the other layer weights (norms), all float."""
    model, c = build(tiny_path, method, "scan")
    gd, st = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda st, t, p, cache, m: nnx.merge(gd, st)(t, p, cache, m)[0])(st, *step_inputs(c))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    eqn = scans[0]
    body = eqn.params["jaxpr"].jaxpr
    # an operand the scan slices per layer (xs) is [L, ...] outside and [...] in the body; a constant
    # (or carry) has the same shape in both
    pairs = [(o.aval, b.aval) for o, b in zip(eqn.invars, body.invars, strict=True)]
    sliced = [o for o, b in pairs if o.shape == (eqn.params["length"],) + b.shape]
    whole = [o for o, b in pairs if o.shape == b.shape]
    assert len(sliced) + len(whole) == len(pairs)
    qdtype = jnp.int8 if method == "int8" else jnp.uint8
    assert len([o for o in whole if o.dtype == qdtype and o.ndim >= 3]) == len(QUANT_PARAMS), whole
    assert sliced and all(jnp.issubdtype(o.dtype, jnp.floating) for o in sliced), sliced


def test_gpu_lowering_keeps_float8_and_the_plain_dot(tiny_path, monkeypatch):
    """On a GPU backend (simulated: jax.default_backend() says "gpu") an fp8 model holds float8_e4m3fn
    weights and its forward, exported for CUDA (unrolled layers, the GPU default), converts each whole
    float8 parameter for its dot (the plain path, no column chunks); no uint8 bits anywhere. With XLA's
    dot for decode-sized steps too (JAXLLM_QUANT_MATMUL=xla; the default Pallas quant_matmul reads the
    float8 weight in place: tests/models/test_quant_pallas.py)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("JAXLLM_QUANT_MATMUL", "xla")
    assert not quant_dot.holds_fp8_bits(None) and not quant_dot.use_chunked(None)
    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model

    ck = load_checkpoint(tiny_path)
    c = ck.config
    model = build_model(c, ck.params, jnp.float32, layer_loop="unroll", quantization="fp8",
                        attention_impl="reference")
    qs = [v.q for _, v in held_quant(model)]
    assert len(qs) == c.num_layers * len(QUANT_PARAMS) and {q.dtype for q in qs} == {jnp.dtype(jnp.float8_e4m3fn)}
    gd, st = nnx.split(model)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves((st, *step_inputs(c)))]
    treedef = jax.tree.structure((st, *step_inputs(c)))

    def fwd(*leaves):
        st, t, p, cache, m = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(gd, st)(t, p, cache, m)[0]

    text = jax.export.export(jax.jit(fwd), platforms=["cuda"])(*args).mlir_module()
    # each held weight, a float8 parameter, converted whole (the plain dot's operand: no column chunks)
    whole = re.findall(r"stablehlo\.convert %arg\d+ : \(tensor<([\dx]+)xf8E4M3FN>\) -> tensor<([\dx]+)xf32>", text)
    assert len(whole) == len(qs) and all(a == b for a, b in whole), whole
    assert sorted(a for a, _ in whole) == sorted("x".join(map(str, q.shape)) for q in qs)
    assert "ui8" not in text and "bitcast_convert" not in text
