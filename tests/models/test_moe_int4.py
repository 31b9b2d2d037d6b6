"""4-bit experts (`--quantization int4` on Mixtral / Qwen3-MoE, and AWQ / GPTQ experts' asymmetric form;
jaxllm/models/moe_quant.py's blocked paths): each of the three expert paths against a numpy reference on
the weights dequantized here from q's bits (tight) and on the unquantized weights (loose), packed two a
byte or XLA int4; what XLA CPU keeps in 4 bits; a tiny model quantized at load against itself
dequantized; an engine's greedy run; the CUDA export of the grouped path (TP: tests/parallel/test_tp_moe_int4.py)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.models.llama import LlamaForCausalLM, build_model
from jaxllm.models.moe import moe_mlp
from jaxllm.models.quant import EXPERT_QUANT_PARAMS, QUANT_PARAMS, QuantWeight, dequantize, quantize_experts
from tests.engine_checks import assert_warm_and_greedy, logits_of
from tests.models.hf_tiny import make_tiny_hf
from tests.models.test_moe import reference_moe, weights
from tests.models import test_moe_quant
from tests.models.test_moe_quant import _float_expert_arrays

IMPLS = ("grouped", "dense", "gather")


def np_unpack(w: QuantWeight) -> np.ndarray:
    """q [X, in, out] values (int): an XLA int4 / uint4 q as it is, a packed one read byte by byte (byte j
    of block g: row g*B + j in the low nibble, g*B + B/2 + j in the high one, two's complement for int4)."""
    q = np.asarray(w.q)
    if not w.packed:
        return q.astype(np.int32)
    X, half, out = q.shape
    nb = w.scale.shape[-2]
    B = 2 * half // nb
    v = np.zeros((X, 2 * half, out), np.int32)
    for g in range(nb):
        for j in range(B // 2):
            byte = q[:, g * B // 2 + j].astype(np.int32)
            lo, hi = byte & 0xF, byte >> 4
            if w.packed == "int4":
                lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
            v[:, g * B + j], v[:, g * B + B // 2 + j] = lo, hi
    return v


def np_dequantize(w: QuantWeight) -> np.ndarray:
    """[X, in, out] f32: each value times its group's scale (+ its group's offset)."""
    q = np_unpack(w).astype(np.float32)
    G = q.shape[1] // w.scale.shape[-2]
    d = q * np.repeat(np.asarray(w.scale, np.float32), G, axis=1)
    if w.offset is not None:
        d = d + np.repeat(np.asarray(w.offset, np.float32), G, axis=1)
    return d


def asymmetric(rng, w: np.ndarray, G: int, pack: bool) -> QuantWeight:
    """An AWQ / GPTQ-style uint4 QuantWeight of w [X, in, out]: per group min/max, offset -s * z."""
    from jaxllm.models.quant import pack_int4

    X, K, N = w.shape
    gw = w.reshape(X, K // G, G, N)
    lo, hi = np.minimum(gw.min(2), 0), np.maximum(gw.max(2), 0)
    s = ((hi - lo) / 15 + 1e-6).astype(np.float16)  # [X, K/G, N]
    z = np.clip(np.round(-lo / s.astype(np.float32)), 0, 15)
    q = np.clip(np.round(gw / s.astype(np.float32)[:, :, None]) + z[:, :, None], 0, 15).reshape(w.shape)
    qw = QuantWeight(jnp.asarray(q.astype(ml_dtypes.uint4)), jnp.asarray(s),
                     jnp.asarray(-(s.astype(np.float32) * z)))
    return pack_int4(qw) if pack else qw


@pytest.mark.parametrize("form", ["rtn", "rtn-packed", "awq", "awq-packed"])
@pytest.mark.parametrize("T,X,k", [(1, 8, 2), (13, 6, 2)])
def test_paths_match_dequantized_reference(form, T, X, k):
    rng = np.random.default_rng(T * 10 + X)
    E, F = 256, 64  # rtn groups: 128 along E (2 a row), 64 along F
    x = rng.normal(0, 1, (T, E)).astype(np.float32)
    wr, wg, wu, wd = weights(rng, X, E, F)
    gate_up = np.concatenate([wg, wu], axis=-1)  # [X, E, 2F]
    pack = form.endswith("packed")
    if form.startswith("rtn"):
        qgu, qd = (quantize_experts(jnp.asarray(w), "int4", pack4=pack) for w in (gate_up, wd))
        assert qgu.scale.shape == (X, 2, 2 * F) and qd.scale.shape == (X, 1, E) and qgu.offset is None
    else:
        qgu, qd = asymmetric(rng, gate_up, 32, pack), asymmetric(rng, wd, 16, pack)
    assert qgu.q.dtype == (jnp.uint8 if pack else jnp.int4 if form == "rtn" else jnp.uint4)
    assert qgu.q.shape[1] == (E // 2 if pack else E)
    dgu, dd = np_dequantize(qgu), np_dequantize(qd)
    tight = reference_moe(x, wr, dgu[..., :F], dgu[..., F:], dd, k, True)
    loose = reference_moe(x, wr, wg, wu, wd, k, True)
    for impl in IMPLS:
        got = np.asarray(jax.jit(lambda *a, impl=impl: moe_mlp(*a, k, True, impl=impl))(x, wr, qgu, qd))
        np.testing.assert_allclose(got, tight, rtol=1e-4, atol=1e-5 * np.abs(tight).max(), err_msg=impl)
        err = np.abs(got - loose).max() / np.abs(loose).max()
        assert 0 < err < 0.25, (impl, err)  # > 0: the 4-bit q is used


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's buffers")
def test_cpu_keeps_experts_in_4_bits():
    """Packed int4 experts: dense (one expert dequantized per loop iteration) and gather (the T*k routed
    experts) write no float array of all the experts' shape, their temp memory about one expert (dense)
    or the T*k routed ones (gather) in f32. grouped (not a CPU default) dequantizes every expert."""
    X, E, F, k = 8, 256, 512, 2
    gu = quantize_experts(jnp.ones((X, E, 2 * F)), "int4", pack4=True)
    wd = quantize_experts(jnp.ones((X, F, E)), "int4", pack4=True)
    assert gu.q.shape == (X, E // 2, 2 * F) and gu.q.dtype == jnp.uint8
    shapes = {(X, E, 2 * F), (X, F, E)}
    f32_all = (X * E * 2 * F + X * F * E) * 4
    for impl, T in (("dense", 16), ("gather", 1), ("grouped", 16)):
        c = jax.jit(lambda x, wr, a, b, impl=impl: moe_mlp(x, wr, a, b, k, True, impl=impl)).lower(
            jnp.ones((T, E)), jnp.ones((E, X)), gu, wd).compile()
        copies, temp = _float_expert_arrays(c.as_text(), shapes), c.memory_analysis().temp_size_in_bytes
        print(impl, f"temp {temp / 2**20:.2f} MiB (f32 experts {f32_all / 2**20:.1f})", copies)
        if impl == "grouped":
            assert copies and temp >= f32_all * 0.9
        else:
            bound = f32_all / X * (2.5 if impl == "dense" else 2.2 * T * k)
            assert not copies and temp < bound, (copies, temp, bound)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moe_int4"))


def dequantized_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model (unrolled layers) with every held QuantWeight replaced by its f32 weight: the
    experts by np_dequantize, the attention projections by quant.dequantize."""
    def dequant(name, w):
        return np_dequantize(w) if name in EXPERT_QUANT_PARAMS else dequantize(w, QUANT_PARAMS[name])

    return test_moe_quant.dequantized_model(model, dequant)


# Measured (tiny random models, fp32, 45 positions, max |ref logit| 3.30 / 3.04), mixtral / qwen3_moe: int4 RTN
# (groups of 64 along E, 96 / 48 along F) mean |logit error| 0.275 / 0.177, greedy agreement 0.42 / 0.62 (int8:
# 0.017 / 0.031; a random tiny model has many near-tied logits). Bounds ~2.2x, agreement -0.1.
MAX_MEAN_ERR, MIN_GREEDY_AGREE = 0.6, 0.3


def test_model_logits_each_path(root, monkeypatch):
    """The tiny Mixtral quantized int4 at load (attention projections and experts; router, norms and
    embeddings full precision): on each expert path its logits equal the dequantized model's (tight)
    and are near the unquantized model's (loose). The fp32 references are computed once (dense path:
    the paths agree within 1e-5 in fp32, tests/models/test_moe.py); Qwen3-MoE / Qwen2-MoE 4-bit
    experts run in tests/checkpoints/test_hf_int4_moe.py."""
    arch = "mixtral"
    from checkpoints import load_checkpoint

    ck = load_checkpoint(make_tiny_hf(arch, root))
    c = ck.config
    model = build_model(c, dict(ck.params), jnp.float32, layer_loop="unroll", quantization="int4",
                        attention_impl="reference")
    full = build_model(c, dict(ck.params), jnp.float32, layer_loop="unroll", attention_impl="reference")
    held = model.layers[0].arrays()
    gu = held["we_gate_up"]
    assert isinstance(gu, QuantWeight) and gu.method == "int4" and gu.scale.ndim == gu.q.ndim
    assert not isinstance(held["router"], QuantWeight)
    deq = dequantized_model(model)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in (5, 40)]
    monkeypatch.setenv("JAXLLM_MOE", "dense")
    want, ref = logits_of(deq, c, seqs), logits_of(full, c, seqs)
    for impl in IMPLS:
        monkeypatch.setenv("JAXLLM_MOE", impl)
        got = logits_of(model, c, seqs)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=impl)
        err, agree = np.abs(got - ref).mean(), (got.argmax(-1) == ref.argmax(-1)).mean()
        print(arch, impl, f"mean logit err {err:.4f} (max |ref| {np.abs(ref).max():.3f}), agree {agree:.3f}")
        assert np.abs(ref).max() > 0.5 and 0 < err < MAX_MEAN_ERR, (impl, err)
        assert agree >= MIN_GREEDY_AGREE, (impl, agree)


def test_engine_greedy_int4(root):
    """The served path (CPU auto experts: gather for decode, dense for prefill) with int4 experts:
    nothing compiles after warm-up and greedy tokens are the quantized model's own continuation."""
    from checkpoints import load_checkpoint
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path = make_tiny_hf("mixtral", root)
    engine = build_engine(EngineConfig(model=path, max_model_len=64, block_size=16, max_num_seqs=2,
                                       max_num_batched_tokens=64, quantization="int4"), compile_cache=False)
    ck = load_checkpoint(path)
    model = build_model(ck.config, ck.params, jnp.float32, quantization="int4")
    assert_warm_and_greedy(engine, lambda seq: logits_of(model, ck.config, [seq]), check=(1, 2))


def test_grouped_int4_exports_for_cuda(monkeypatch):
    """tiny-mixtral, int4 experts, bf16, unrolled layers (the GPU defaults: q held as XLA int4) exports
    for CUDA: per layer two ragged dots of T*k rows over the layer's experts dequantized to bf16."""
    import re

    from checkpoints.dummy import dummy_config, dummy_params
    from tests.models.moe_export import export_step_for_cuda, ragged_dots

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    c = dummy_config("tiny-mixtral")
    model = build_model(c, dummy_params(c, jnp.bfloat16), jnp.bfloat16, layer_loop="unroll",
                        attention_impl="reference", quantization="int4")
    assert model.layers[0].arrays()["we_down"].q.dtype == jnp.int4
    text = export_step_for_cuda(model, c)  # T = 7 tokens
    T, k, X, E, F = 7, c.num_experts_per_tok, c.num_experts, c.hidden_size, c.moe_intermediate_size
    dots = ragged_dots(text)
    want = {(f"tensor<{T * k}x{E}xbf16>, tensor<{X}x{E}x{2 * F}xbf16>, tensor<{X}xi32>", f"tensor<{T * k}x{2 * F}xbf16>"),
            (f"tensor<{T * k}x{F}xbf16>, tensor<{X}x{F}x{E}xbf16>, tensor<{X}xi32>", f"tensor<{T * k}x{E}xbf16>")}
    assert len(dots) == 2 * c.num_layers and set(dots) == want, dots
    assert re.search(rf"tensor<{X}x{F}x{E}xi4>", text)  # the int4 parameter is what the step reads

