"""GGUF kept quantized (checkpoints/gguf_quant.py): a Q8_0 file loads its projections as int8 with
their block-32 scales, checked against the same file dequantized by the gguf package (the loader's
fp32 path, an independent parse of the bytes); the `--quantization` rules for GGUF and already
quantized HF checkpoints; the served path compiles nothing after warm-up."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints.gguf_loader as gguf_loader
from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, weight_bytes
from tests.checkpoints.gguf_tiny import tiny_llama_hd32, write_gguf_from_hf
from tests.engine_checks import assert_warm_and_greedy, logits_of

PROJ = ("layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up", "layers.w_down")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gguf_q"))
    hf = tiny_llama_hd32(root)
    return hf, write_gguf_from_hf(hf, f"{root}/q8.gguf", "Q8_0"), write_gguf_from_hf(hf, f"{root}/q4_1.gguf", "Q4_1")


@pytest.fixture(scope="module")
def loaded(files):
    """(kept-quantized params, the same file dequantized by the gguf package, config)."""
    _, q8, _ = files
    kept = load_checkpoint(q8)
    mp = pytest.MonkeyPatch()
    mp.setattr(gguf_loader, "kept_projections", lambda tensors, config: {})  # the fp32 path of before
    try:
        ref = load_checkpoint(q8)
    finally:
        mp.undo()
    return kept.params, ref.params, kept.config


def test_q8_0_loads_int8_with_block_scales(loaded, caplog):
    params, ref, c = loaded
    for name in PROJ:
        w = params[name]
        assert isinstance(w, QuantWeight) and w.q.dtype == np.int8 and w.scale.dtype == np.float16, name
        assert w.q.shape == ref[name].shape
        blocked = 2 if name == "layers.wo" else 1  # the last contracted axis, after "layers"
        assert w.scale.shape[blocked] * 32 == w.q.shape[blocked] and w.scale.ndim == w.q.ndim
        # the kept bytes reproduce the gguf package's dequantization exactly (d * q, nothing re-rounded)
        from jaxllm.models.quant import dequantize
        np.testing.assert_array_equal(np.asarray(dequantize(w, 2 if name == "layers.wo" else 1, stacked=True)),
                                      ref[name])
        # 1 byte + 2/32 bytes a weight: about 0.27x the fp32 load, 0.53x bf16
        assert weight_bytes(w) <= 1.0625 * ref[name].size
    assert params["embed"].dtype == np.float32 and not isinstance(params["layers.input_norm"], QuantWeight)


@pytest.fixture(scope="module")
def models(loaded):
    params, ref, c = loaded
    return (build_model(c, dict(params), jnp.float32, layer_loop="scan"),
            build_model(c, dict(ref), jnp.float32, layer_loop="scan"))


def test_q8_0_logits_match_dequantized_load(loaded, models):
    """<= 32 tokens: per-block partial dots scaled after; more: the weight dequantized into the dot
    (quant.quant_einsum). Both against the fp32 model built from the gguf package's dequantization."""
    _, _, c = loaded
    mq, mf = models
    assert mq.quantization == "int8"
    held = mq.layers.arrays()
    assert all(held[k].q.dtype == jnp.int8 for k in ("wqkv", "wo", "w_gate_up", "w_down"))
    for lens in ((3, 20), (40,)):  # 23 tokens: blockwise dot; 40: dequantized dot
        seqs = [np.random.default_rng(1).integers(0, 256, n).tolist() for n in lens]
        got, want = logits_of(mq, c, seqs), logits_of(mf, c, seqs)
        assert np.abs(want).max() > 0.5
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0, err_msg=str(lens))
    ref_held = mf.layers.arrays()
    for short in ("wqkv", "wo", "w_gate_up", "w_down"):  # 1 + 2/32 bytes a weight vs 4
        assert weight_bytes(held[short]) <= 0.27 * weight_bytes(ref_held[short]), short


def test_quantization_flag_rules_for_gguf(files, loaded, monkeypatch):
    """Q8_0 + fp8: one line (re-rounding int8 to e4m3 only adds error); Q8_0 + int8: kept as is;
    Q4_1 + int8: its dequantized weights re-quantized per channel."""
    _, q8, q4 = files
    params, _, c = loaded
    with pytest.raises(ValueError, match=r"^quantization='fp8' conflicts with the checkpoint's int8 weights \(.*"
                                         r"GGUF Q8_0, kept quantized\); load it without quantization or with 'int8'$"):
        build_model(c, dict(params), jnp.float32, quantization="fp8")
    m8 = build_model(c, dict(params), jnp.float32, quantization="int8")
    assert m8.layers.arrays()["wqkv"].scale.ndim == 4  # [L, E/32, H+2K, D]: the file's block scales kept
    monkeypatch.setenv("JAXLLM_GGUF_Q4", "fp32")  # Q4_1 dequantized (the default keeps it 4-bit: test_gguf_q4.py)
    ck = load_checkpoint(q4)
    assert not any(isinstance(v, QuantWeight) for v in ck.params.values())
    m4 = build_model(ck.config, ck.params, jnp.float32, quantization="int8")
    assert m4.quantization == "int8" and m4.layers.arrays()["wqkv"].scale.ndim == 3  # per output channel


def test_prequantized_hf_checkpoint_is_one_line_error(files, tmp_path):
    hf, _, _ = files
    d = str(tmp_path / "gptq")
    shutil.copytree(hf, d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config.quant_method='bitsandbytes' is not supported; "
                                              r"jaxllm loads 'compressed-tensors' .* and 'fp8' "):
        load_checkpoint(d)


def test_fp8_on_backend_without_float8_is_one_line_error(loaded, monkeypatch):
    import jaxllm.models.quant as quant

    def refuse(x):
        raise RuntimeError("F8E4M3FN is not supported")

    monkeypatch.setattr(quant.jax, "block_until_ready", refuse)
    _, ref, c = loaded
    with pytest.raises(ValueError, match=r"^quantization='fp8' is not supported on the \w+ backend "
                                         r"\(float8_e4m3fn: RuntimeError\); use quantization='int8'$"):
        build_model(c, dict(ref), jnp.float32, quantization="fp8")


def test_engine_q8_0_gguf_int8_without_flag_zero_compiles(files, loaded, models, monkeypatch):
    """A Q8_0 GGUF served with no flag, in the "unroll" layer loop (each layer's QuantWeight placed on
    its own; the scan loop is the reference): int8 weights, the resolved config says so, warm-up
    compiles every bucket and mixed traffic (3..50-token prompts: both matmul paths) compiles nothing
    after; greedy output equals the argmax of an unpaged forward of the same weights."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    _, q8, _ = files
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", "unroll")
    engine = build_engine(EngineConfig(model=q8, max_model_len=128, block_size=16, max_num_seqs=2,
                                       max_num_batched_tokens=64), compile_cache=False)
    assert engine.config.quantization == "int8"
    held = sum(x.dtype == jnp.int8 for x in jax.tree.leaves(engine.runner.state))
    assert held == 4 * 2  # 4 held projections x 2 layers
    c = loaded[2]
    # prompts 0 (3 tokens: blockwise) and 1 (17 + 4: too)
    assert_warm_and_greedy(engine, lambda seq: logits_of(models[0], c, [seq]), check=(0, 1))
