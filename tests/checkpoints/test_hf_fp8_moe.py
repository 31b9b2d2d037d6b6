"""fp8 HF mixture-of-experts checkpoints (checkpoints/hf_fp8_experts.py): tiny Mixtral / Qwen3-MoE
checkpoints quantized here with numpy / ml_dtypes (attention projections and every expert; the router
full precision, as vLLM's fp8 MoE checkpoints leave it) load with their experts kept float8_e4m3fn,
exactly the numpy-dequantized weights, and their logits equal the dequantized fp32 checkpoint's on each
expert path; `--quantization` rules; a checkpoint whose experts are not all float8 dequantizes them."""
import json
import logging
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, dequantize_experts
from tests.checkpoints.fp8_tiny import ct_config, quantize, write_dir
from tests.engine_checks import logits_of
from tests.models.hf_tiny import make_tiny_hf

# tiny configs: hidden 64, mixtral F 96 (4 experts), qwen3_moe F 48 (8 experts); blocks of [32, 32]: the
# Qwen3 experts' F = 48 = 1.5 blocks (a partial block; jaxllm's blocks of gcd(32, 48) = 16 along F)
CASES = {  # name -> (arch, quantization_config, strategy)
    "mixtral-ct-channel": ("mixtral", ct_config("channel", True), "channel"),
    "mixtral-fp8-tensor": ("mixtral", {"quant_method": "fp8", "activation_scheme": "dynamic"}, "tensor"),
    "qwen3-fp8-block": ("qwen3_moe", {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [32, 32]}, "block"),
}
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", ".experts.")  # every linear but the router and LM head
SEQS = [np.random.default_rng(2).integers(0, 256, n).tolist() for n in (5, 40)]


def make_moe_fp8(root: str, name: str, skip_expert: str | None = None) -> tuple[str, str]:
    """(fp8 checkpoint dir, its numpy-dequantized fp32 reference dir) from the tiny HF model of CASES[name]
    (`skip_expert`: one expert weight left in full precision)."""
    from safetensors.numpy import load_file

    arch, qc, strategy = CASES[name]
    src = make_tiny_hf(arch, root)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    key = "weight_scale_inv" if qc["quant_method"] == "fp8" and strategy == "block" else "weight_scale"
    fp8, ref = {}, {}
    for n, w in load_file(os.path.join(src, "model.safetensors")).items():
        w = np.asarray(w, np.float32)
        if n.endswith(".weight") and any(s in n for s in QUANTIZED) and n != skip_expert:
            q, s, deq = quantize(w, strategy, tuple(qc.get("weight_block_size", (128, 128))))
            fp8[n], fp8[n[:-len("weight")] + key], ref[n] = q, s, deq
        else:
            fp8[n] = ref[n] = w
    tag = name + ("-skip" if skip_expert else "")
    return (write_dir(os.path.join(root, tag), fp8, dict(cfg, quantization_config=qc)),
            write_dir(os.path.join(root, tag + "-ref"), ref, cfg))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8moe"))


@pytest.mark.parametrize("name", list(CASES))
def test_experts_kept_fp8_and_logits_equal_dequantized(name, root, caplog, monkeypatch):
    fp8_dir, ref_dir = make_moe_fp8(root, name)
    with caplog.at_level(logging.INFO, logger="jaxllm.checkpoints"):
        ck = load_checkpoint(fp8_dir)
    ref = load_checkpoint(ref_dir)
    c = ck.config
    X, E, F = c.num_experts, c.hidden_size, c.moe_intermediate_size
    block = CASES[name][2] == "block"
    for p, (n_in, n_out) in {"layers.we_gate": (E, F), "layers.we_up": (E, F), "layers.we_down": (F, E)}.items():
        w = ck.params[p]
        assert isinstance(w, QuantWeight) and w.q.dtype == ml_dtypes.float8_e4m3fn, p
        want_scale = (c.num_layers, X, n_in // np.gcd(32, n_in), n_out) if block else (c.num_layers, X, n_out)
        assert w.scale.shape == want_scale, (p, w.scale.shape)
        np.testing.assert_array_equal(np.asarray(dequantize_experts(w, xp=np)), ref.params[p], err_msg=p)
    assert not isinstance(ck.params["layers.router"], QuantWeight)
    assert "layers.we_down, layers.we_gate, layers.we_up" in caplog.text and ".experts." not in caplog.text
    mq = build_model(c, dict(ck.params), jnp.float32, layer_loop="unroll", attention_impl="reference")
    mf = build_model(ref.config, dict(ref.params), jnp.float32, layer_loop="unroll", attention_impl="reference")
    assert mq.quantization == "fp8" and mf.quantization is None
    assert mq.layers[0].arrays()["we_gate_up"].q.dtype == jnp.uint8  # CPU: float8 held as its bits
    # the fp32 reference once, on the default path (the paths agree in fp32: tests/models/test_moe.py), in
    # the shared forward (both Mixtral cases' references: one program); each path of the fp8 model against it
    want = logits_of(mf, ref.config, SEQS, share=True)
    assert np.abs(want).max() > 0.5
    for impl in ("grouped", "dense", "gather"):
        monkeypatch.setenv("JAXLLM_MOE", impl)
        got = logits_of(mq, c, SEQS, share=True)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0, err_msg=impl)


def test_quantization_flag_rules(root):
    """fp8 checkpoint + --quantization fp8: as without the flag; + int8: one line (no re-rounding)."""
    fp8_dir, _ = make_moe_fp8(root, "mixtral-ct-channel")
    ck = load_checkpoint(fp8_dir)
    assert build_model(ck.config, dict(ck.params), jnp.float32, quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match=r"quantization='int8' conflicts with the checkpoint's fp8 weights") as e:
        build_model(ck.config, dict(ck.params), jnp.float32, quantization="int8")
    assert "\n" not in str(e.value)


def test_experts_not_all_fp8_are_dequantized(root, caplog):
    """One expert weight stored in full precision: every expert is dequantized to fp32 (the attention
    projections stay fp8) and the load line lists the experts' float8 tensors as dequantized."""
    skip = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    fp8_dir, ref_dir = make_moe_fp8(root, "mixtral-ct-channel", skip_expert=skip)
    with caplog.at_level(logging.INFO, logger="jaxllm.checkpoints"):
        ck = load_checkpoint(fp8_dir)
    ref = load_checkpoint(ref_dir)
    for p in ("layers.we_gate", "layers.we_up", "layers.we_down"):
        assert not isinstance(ck.params[p], QuantWeight), p
        np.testing.assert_array_equal(ck.params[p], ref.params[p], err_msg=p)
    assert isinstance(ck.params["layers.wq"], QuantWeight)
    assert "experts.0.w1.weight" in caplog.text


def test_convert_to_orbax_stores_the_dequantized_experts(root, tmp_path):
    """checkpoints.convert: the kept float8 experts (block scales) are written as their fp32
    dequantization, equal to the numpy reference's."""
    from checkpoints.convert import main

    fp8_dir, ref_dir = make_moe_fp8(root, "qwen3-fp8-block")
    assert main([fp8_dir, str(tmp_path / "orbax")]) == 0
    got, ref = load_checkpoint(str(tmp_path / "orbax")), load_checkpoint(ref_dir)
    for p in ("layers.we_gate", "layers.we_up", "layers.we_down", "layers.wq"):
        np.testing.assert_array_equal(np.asarray(got.params[p]), ref.params[p], err_msg=p)
