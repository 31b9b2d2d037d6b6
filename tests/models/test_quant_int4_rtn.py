"""`--quantization int4` at load (jaxllm/models/quant.py `quantize_int4`): round-to-nearest, symmetric,
group scales along the last contracted axis. Checked against an independent numpy quantizer: the
held weights dequantize to its weights exactly, and a tiny model built with the flag gives the
logits (to float rounding) and the greedy tokens of the fp32 model holding those numpy-dequantized
weights, on the chunked (packed) and einsum paths and both layer loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models import quant, quant_dot
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, dequantize, int4_group, quantize
from tests.engine_checks import logits_of
from tests.models.hf_tiny import make_tiny_hf

CONTRACTED = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": 2, "layers.w_gate": 1,
              "layers.w_up": 1, "layers.w_down": 1}


def numpy_rtn(w: np.ndarray, axis: int, group: int, codes: bool = False):
    """The int4 RTN weight, independently: per `group` entries along `axis`, s = absmax / 7,
    q = round-half-even(w / s) clipped to [-7, 7], back to s * q."""
    w = np.moveaxis(w.astype(np.float32), axis, -1)
    g = w.reshape(w.shape[:-1] + (w.shape[-1] // group, group))
    amax = np.abs(g).max(-1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(g / s), -7, 7)
    out = np.moveaxis((q * s).reshape(w.shape), -1, axis)
    return (out, np.moveaxis(q.reshape(w.shape), -1, axis).astype(np.int8)) if codes else out


def test_group_rule():
    # 128 when it divides; else the largest even divisor below; else the whole axis
    assert [int4_group(k) for k in (1536, 256, 576, 64, 96, 16, 7, 9)] == [128, 128, 96, 64, 96, 16, 7, 9]


@pytest.mark.parametrize("pack", [False, True], ids=["int4", "packed"])
def test_quantize_int4_matches_numpy(pack):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4, 32, 40)).astype(np.float32)  # stacked wo [L, H, D, E]: groups along D
    w[0, 1, :, 3] = 0.0  # an all-zero group: scale 1, q 0
    qw = quantize(jnp.asarray(w), "int4", 2, stacked=True, pack4=pack)
    assert qw.method == "int4" and qw.shape == w.shape and qw.scale.shape == (2, 4, 1, 40)
    assert qw.q.dtype == (jnp.uint8 if pack else jnp.int4) and qw.packed == ("int4" if pack else None)
    codes = np.asarray(qw.unpacked().q).astype(np.int8)
    want_w, want_q = numpy_rtn(w, 2, 32, codes=True)
    np.testing.assert_array_equal(codes, want_q)  # the integers exactly
    # the scales within an ulp (XLA CPU divides by 7 as a multiply by 1/7)
    np.testing.assert_allclose(np.asarray(dequantize(qw, 2, stacked=True)), want_w, rtol=3e-7, atol=0)
    assert int(np.abs(codes).max()) == 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_int4_rtn")))


@pytest.mark.parametrize("group", [128, 32], ids=["g128-fallbacks", "g32"])
def test_model_int4_equals_numpy_dequantized(tiny, group, monkeypatch):
    """hidden 64, intermediate 96, head_dim 16: with groups of 128 every axis falls back (64, 96, 16);
    with 32, two and three groups per column (head_dim 16 still falls back to 16)."""
    monkeypatch.setattr(quant, "INT4_GROUP", group)
    jax.clear_caches()  # the group size is read at trace time
    ck = load_checkpoint(tiny)
    c = ck.config
    ref = dict(ck.params)
    for name, nc in CONTRACTED.items():
        k = ref[name].shape[nc]
        ref[name] = numpy_rtn(np.asarray(ref[name]), nc, int4_group(k))
    seqs = [list(range(3, 20)), list(range(100, 140))]
    want = logits_of(build_model(c, ref, jnp.float32, layer_loop="scan"), c, seqs)
    assert np.abs(want).max() > 0.5
    for loop, chunked in (("scan", True), ("unroll", True), ("scan", False)):
        monkeypatch.setattr(quant_dot, "ENABLED", chunked)
        model = build_model(c, dict(load_checkpoint(tiny).params), jnp.float32, layer_loop=loop, quantization="int4")
        assert model.quantization == "int4"
        held = model.layers.arrays() if loop == "scan" else model.layers[0].arrays()
        for short in ("wqkv", "wo", "w_gate_up", "w_down"):
            w = held[short]
            assert isinstance(w, QuantWeight) and w.scale.ndim == w.q.ndim and w.bits == 4, short
            assert w.packed == ("int4" if chunked else None), short
        assert held["w_down"].scale.shape[-2] == 96 // int4_group(96)
        got = logits_of(model, c, seqs)
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0, err_msg=f"{loop} {chunked}")
        assert (got.argmax(-1) == want.argmax(-1)).all()
    jax.clear_caches()


def test_engine_int4_greedy_equals_numpy_dequantized(tiny, tmp_path):
    """Through the engine: `quantization="int4"` reported, greedy tokens equal to the fp32 model of the
    numpy-dequantized weights (the same engine path with no flag)."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7], list(range(30, 52)))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(max_model_len=64, block_size=16, max_num_seqs=2, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20)
    e = build_engine(EngineConfig(model=tiny, quantization="int4", **kw), compile_cache=False, warmup=False)
    assert e.config.quantization == "int4"
    got = [o.outputs[0].token_ids for o in LLM("tiny", engine=e).generate(prompts, params, use_tqdm=False)]
    ck = load_checkpoint(tiny)
    for name, nc in CONTRACTED.items():
        ck.params[name] = numpy_rtn(np.asarray(ck.params[name]), nc, int4_group(ck.params[name].shape[nc]))
    model = build_model(ck.config, ck.params, jnp.float32, layer_loop="scan")
    # the reference: one full forward of each prompt + its 8 tokens (causal: position i's logits see
    # tokens <= i alone), so greedy means each token is the argmax at the position before it; one
    # program for both sequences instead of one per growing length
    seqs = [p["prompt_token_ids"] + list(g) for p, g in zip(prompts, got)]
    ref = logits_of(model, ck.config, seqs)  # [sum(len), V]
    starts = np.cumsum([0] + [len(s) for s in seqs])
    want = [[int(ref[start + len(p["prompt_token_ids"]) - 1 + k].argmax()) for k in range(len(g))]
            for start, p, g in zip(starts, prompts, got)]
    assert [len(g) for g in got] == [8, 8] and got == want


@pytest.mark.parametrize("mode", ["xla", "auto"])
def test_gpu_lowering_of_int4(tiny, monkeypatch, mode):
    """On a GPU backend (simulated: jax.default_backend() says "gpu"), the forward exported for CUDA
    (unrolled layers, the GPU default). JAXLLM_QUANT_MATMUL=xla: `--quantization int4` holds XLA's int4
    q (not the CPU's uint8 pairs) and each weight's int4 parameter is converted for the einsum path's
    per-block dots, no uint8 unpacking anywhere. "auto" (the Pallas quant_matmul on GPUs): the q are
    held as uint8 pairs, and each projection whose groups the kernel takes is one Triton call."""
    import re
    import warnings

    from flax import nnx
    from jax.experimental.pallas import triton as plgpu

    from tests.models.test_quant_fp8_bits import held_quant, step_inputs
    from tests.pallas_kernels.test_pk_lowering import H100

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("JAXLLM_QUANT_MATMUL", mode)
    assert not quant_dot.packs_int4(None) and not quant_dot.use_chunked(None)
    ck = load_checkpoint(tiny)
    c = ck.config
    model = build_model(c, ck.params, jnp.float32, layer_loop="unroll", quantization="int4", attention_impl="reference")
    qs = [v.q for _, v in held_quant(model)]
    assert len(qs) == c.num_layers * 4
    gd, st = nnx.split(model)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves((st, *step_inputs(c)))]
    treedef = jax.tree.structure((st, *step_inputs(c)))

    def fwd(*leaves):
        st, t, p, cache, m = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(gd, st)(t, p, cache, m)[0]

    triton = [jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)]
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100):
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        exported = jax.export.export(jax.jit(fwd), platforms=["cuda"], disabled_checks=triton)(*args)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    if mode == "auto":
        assert {q.dtype for q in qs} == {jnp.dtype(jnp.uint8)}
        assert {v.packed for _, v in held_quant(model)} == {"int4"}
        # wqkv and w_gate_up per layer; wo's groups are head_dim 16 here (too short for the kernel) and
        # w_down's are its K of 96 (not a power of two, as Triton's tiles must be): XLA unpacks those
        assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == 2 * c.num_layers
        assert "shift_right" in text
        return
    assert {q.dtype for q in qs} == {jnp.dtype(jnp.int4)}
    assert all(v.packed is None for _, v in held_quant(model))
    params = re.findall(r"%arg\d+: tensor<([\dx]+)xi4>", text)
    assert sorted(params) == sorted("x".join(map(str, q.shape)) for q in qs)
    converts = re.findall(r"stablehlo\.convert %\S+ : \(tensor<([\dx]+)xi4>\) -> tensor<[\dx]+xf32>", text)
    assert len(converts) >= len(qs), converts  # each int4 weight converted for its dot (reshaped per block first)
    assert "xui8>" not in text and "shift_right" not in text
    assert plgpu.CUSTOM_CALL_TARGET_NAME not in text
