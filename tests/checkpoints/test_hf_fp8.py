"""fp8 HF checkpoints (checkpoints/hf_fp8.py, hf_fp8_config.py): tiny checkpoints quantized here with
numpy / ml_dtypes in each layout load with their projections kept float8_e4m3fn, and their logits
equal those of the same weights dequantized in numpy and loaded as a plain fp32 checkpoint (the
independent reference); the `--quantization` rules; the refusals; the KV scales' source."""
import json
import logging
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize, weight_bytes
from tests.checkpoints.fp8_tiny import ct_config, make_fp8
from tests.engine_checks import logits_of  # share=True: no trace-time switch changes in this module

PROJ = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": 2, "layers.w_gate": 1, "layers.w_up": 1,
        "layers.w_down": 1}
FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# name -> (quantization_config, strategy, make_fp8 extras)
CASES = {
    "ct-fp8-tensor": (ct_config("tensor", False), "tensor", dict(input_scale=True)),  # "FP8"
    "ct-fp8-dynamic": (ct_config("channel", True), "channel", {}),  # "FP8_DYNAMIC"
    "ct-block": (ct_config("block", True), "block", {}),  # "FP8_BLOCK"
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": []}, "tensor",
                   dict(input_scale=True, quantize_extra=("lm_head.weight", "model.embed_tokens.weight"))),
    "fp8-block": (FP8_BLOCK, "block", {}),
}
SEQS = [np.random.default_rng(1).integers(0, 256, n).tolist() for n in (5, 40)]  # 5: blockwise dot; 40: dequantized


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8ckpt"))


@pytest.fixture(scope="module")
def dirs(root):
    return {name: make_fp8(root, name, qc, strategy, **kw) for name, (qc, strategy, kw) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_loads_fp8_and_matches_numpy_dequantized(name, dirs, caplog):
    """Each layout: the seven projections load as float8_e4m3fn QuantWeights whose dequantization is
    exactly the numpy reference's weight; the model's logits equal the fp32 reference model's (the
    same products, summed in another order); 1 + 4/in bytes a weight at most."""
    fp8_dir, ref_dir = dirs[name]
    with caplog.at_level(logging.INFO, logger="jaxllm.checkpoints"):
        ck = load_checkpoint(fp8_dir)
    ref = load_checkpoint(ref_dir)
    for p, n in PROJ.items():
        w = ck.params[p]
        assert isinstance(w, QuantWeight) and w.q.dtype == ml_dtypes.float8_e4m3fn, p
        assert w.q.shape == ref.params[p].shape
        assert (w.scale.ndim == w.q.ndim) == (CASES[name][1] == "block"), p
        np.testing.assert_array_equal(np.asarray(dequantize(w, n, stacked=True, xp=np)), ref.params[p], err_msg=p)
        assert weight_bytes(w) <= 1.07 * w.q.size, p
    for p in ("embed", "lm_head", "final_norm"):  # dequantized when stored in fp8 ("fp8-tensor")
        np.testing.assert_array_equal(ck.params[p], ref.params[p], err_msg=p)
    # every case declares fp8 activation quantization: run weight-only, and the load line says so
    assert "activation quantization is not run" in caplog.text
    assert "kept as float8_e4m3fn" in caplog.text and "layers.w_down, layers.w_gate" in caplog.text
    mq = build_model(ck.config, ck.params, jnp.float32)
    mf = build_model(ref.config, ref.params, jnp.float32)
    assert mq.quantization == "fp8" and mf.quantization is None
    got, want = logits_of(mq, ck.config, SEQS, share=True), logits_of(mf, ref.config, SEQS, share=True)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_ignored_layers_stay_full_precision_and_quantize_flag(root):
    """An ignored projection in one layer (compressed-tensors `ignore`): that stacked param (w_down)
    is dequantized, the others kept; --quantization fp8 then quantizes it per channel at load, the
    kept ones are placed as stored; --quantization int8 is refused in one line."""
    skip = ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight")
    fp8_dir, ref_dir = make_fp8(root, "ct-ignore", ct_config("channel", None, ignore=("lm_head", "re:.*1.mlp.down")),
                                "channel", skip=skip)
    ck = load_checkpoint(fp8_dir)
    kept = sorted(k for k, v in ck.params.items() if isinstance(v, QuantWeight))
    assert kept == ["layers.w_gate", "layers.w_up", "layers.wo"]  # q/k/v fused: all or none
    ref = load_checkpoint(ref_dir)
    for p in ("layers.w_down", "layers.wq", "layers.wk"):
        np.testing.assert_array_equal(ck.params[p], ref.params[p], err_msg=p)
    with pytest.raises(ValueError, match=r"^quantization='int8' conflicts with the checkpoint's fp8 weights "
                                         r"\(layers\.w_gate, layers\.w_up, layers\.wo: an fp8 checkpoint, kept "
                                         r"quantized\); load it without quantization or with 'fp8'$"):
        build_model(ck.config, dict(ck.params), jnp.float32, quantization="int8")
    m = build_model(ck.config, dict(ck.params), jnp.float32, quantization="fp8")
    held = m.layers.arrays()
    assert all(isinstance(held[n[len("layers."):]], QuantWeight) for n in QUANT_PARAMS)
    mq = build_model(ck.config, dict(ck.params), jnp.float32)  # no flag: w_down and wqkv stay fp32
    assert not isinstance(mq.layers.arrays()["w_down"], QuantWeight) and mq.quantization == "fp8"
    want = logits_of(build_model(ref.config, ref.params, jnp.float32), ref.config, SEQS, share=True)
    np.testing.assert_allclose(logits_of(mq, ck.config, SEQS, share=True), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    mu = build_model(ck.config, dict(ck.params), jnp.float32, layer_loop="unroll")  # per-layer QuantWeights
    assert isinstance(mu.layers[1].arrays()["wo"], QuantWeight)
    np.testing.assert_allclose(logits_of(mu, ck.config, SEQS, share=True), want, atol=2e-5 * np.abs(want).max(), rtol=0)


def _with_qc(root: str, name: str, qc) -> str:
    fp8_dir, _ = make_fp8(root, name, {"quant_method": "fp8"}, "tensor")
    cfg_path = os.path.join(fp8_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qc
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return fp8_dir


def _ct(**weights):
    qc = ct_config("channel", True)
    qc["config_groups"]["group_0"]["weights"].update(weights)
    return qc


@pytest.mark.parametrize("qc,msg", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     r"quant_method='bitsandbytes' is not supported; jaxllm loads 'compressed-tensors' .* 'fp8' .* and "
     r"'awq' / 'gptq' \(4-bit\); use the full-precision checkpoint"),
    ({"quant_method": "gptq", "bits": 8}, r"bits=8 is not supported; jaxllm loads gptq int4 weights \(bits 4\)$"),
    ({"quant_method": "awq", "bits": 4, "version": "marlin"}, r"version='marlin' is not supported"),
    (_ct(type="int", num_bits=4, strategy="group", group_size=128),
     r"config_groups\.group_0\.weights\.type/num_bits='int4' is not supported; jaxllm loads "
     r"float8 weights"),
    (_ct(type="int", num_bits=8), r"config_groups\.group_0\.weights\.type/num_bits='int8' is not supported"),
    (_ct(strategy="group", group_size=32),
     r"config_groups\.group_0\.weights\.strategy='group' is not supported; jaxllm loads strategies "
     r"tensor, channel, block$"),
    (dict(ct_config("channel", True), format="pack-quantized"),  # float8 weights declared packed: not int4
     r"config_groups\.group_0\.weights=.* is not supported; jaxllm loads pack-quantized int4 weights"),
    ({**ct_config("channel", True), "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                                        "strategy": "channel"},
                                                            "output_activations": {"type": "float", "num_bits": 8}}}},
     r"config_groups\.g\.output_activations=.* is not supported"),
    ({**ct_config("channel", True), "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                                        "strategy": "channel"},
                                                            "input_activations": {"type": "int", "num_bits": 8}}}},
     r"config_groups\.g\.input_activations='int8' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, r"fmt='e5m2' is not supported"),
])
def test_refusals_are_one_line(root, qc, msg):
    d = _with_qc(root, f"refuse-{abs(hash(json.dumps(qc, sort_keys=True))) % 10**8}", qc)
    with pytest.raises(CheckpointError, match=r"^.*config\.json: quantization_config\." + msg) as e:
        load_checkpoint(d)
    assert "\n" not in str(e.value)


def test_bad_scale_shape_names_the_tensor(root):
    """A scale whose shape none of the layouts has: one line naming the tensor and the shapes expected."""
    fp8_dir, _ = make_fp8(root, "bad-scale", {"quant_method": "fp8"}, "tensor",
                          replace={"model.layers.0.mlp.up_proj.weight_scale": np.ones((3,), np.float32)})
    with pytest.raises(CheckpointError, match=r"the scale of tensor model\.layers\.0\.mlp\.up_proj\.weight "
                                              r"\[320, 256\] has shape \[3\]; expected \[\] or \[1\] \(per tensor\), "
                                              r"\[out, 1\] \(per channel\)$"):
        load_checkpoint(fp8_dir)
    missing, _ = make_fp8(root, "no-scale", {"quant_method": "fp8"}, "tensor",
                          replace={"model.layers.1.mlp.up_proj.weight_scale": None})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is float8 but has "
                                              r"no model\.layers\.1\.mlp\.up_proj\.weight_scale\(_inv\) beside it$"):
        load_checkpoint(missing)


def test_config_refusal_before_weights(root):
    """load_config (prompt validation before the engine) refuses the same way without reading weights."""
    from checkpoints.loader import load_config

    d = _with_qc(root, "refuse-early", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"quant_method='bitsandbytes' is not supported"):
        load_config(d)


def test_convert_to_orbax_stores_the_dequantized_weights(dirs, tmp_path):
    """checkpoints.convert on an fp8 checkpoint: the kept float8 projections are written as their
    fp32 dequantization (Orbax holds plain arrays), equal to the numpy reference's."""
    from checkpoints.convert import main

    fp8_dir, ref_dir = dirs["fp8-block"]
    assert main([fp8_dir, str(tmp_path / "orbax")]) == 0
    got, ref = load_checkpoint(str(tmp_path / "orbax")), load_checkpoint(ref_dir)
    for p in PROJ:
        np.testing.assert_array_equal(np.asarray(got.params[p]), ref.params[p], err_msg=p)


def test_fp8_block_checkpoint_matches_transformers_on_dequantized(dirs):
    """A second, outside reference: HF transformers (PyTorch, fp32, eager) on the numpy-dequantized
    checkpoint gives the fp8 block checkpoint's logits."""
    from tests.models.hf_tiny import hf_logits

    fp8_dir, ref_dir = dirs["fp8-block"]
    ck = load_checkpoint(fp8_dir)
    got = logits_of(build_model(ck.config, ck.params, jnp.float32), ck.config, SEQS, share=True)
    want = np.concatenate(hf_logits(ref_dir, SEQS))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_float8_tensors_without_quantization_config_is_one_line(root):
    """float8 tensors in a checkpoint whose config.json has no quantization_config (dropped by hand,
    or never written): one line naming a float8 tensor and the missing field, before any weight is
    read, instead of the safetensors package's failure on the first float8 tensor."""
    d = _with_qc(root, "no-qc", None)
    with pytest.raises(CheckpointError, match=r"^\S+/no-qc/model\.safetensors: holds float8 tensors "
                                              r"\(model\.layers\.0\.mlp\.down_proj\.weight: F8_E4M3, 14 in all\) "
                                              r"but \S+/no-qc/config\.json has no quantization_config "
                                              r"\(an fp8 checkpoint names its scheme there\)$"):
        load_checkpoint(d)


@pytest.mark.parametrize("scale_dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["ct-fp8-dynamic", "fp8-block"])
def test_half_precision_scales_load_exactly(root, name, scale_dtype):
    """weight_scale / weight_scale_inv stored as bfloat16 or float16 (some exporters do): read as the
    f32 of the stored values; the kept weights equal the numpy reference's (q times those scales)."""
    from checkpoints.safetensors_f8 import read_header

    qc, strategy, kw = CASES[name]
    tag = np.dtype(scale_dtype).name
    fp8_dir, ref_dir = make_fp8(root, f"{name}-{tag}", qc, strategy, scale_dtype=scale_dtype, **kw)
    header, _ = read_header(os.path.join(fp8_dir, "model.safetensors"))
    scales = {k: v["dtype"] for k, v in header.items() if "weight_scale" in k}
    assert scales and set(scales.values()) == {"BF16" if scale_dtype == ml_dtypes.bfloat16 else "F16"}
    ck, ref = load_checkpoint(fp8_dir), load_checkpoint(ref_dir)
    for p, n in PROJ.items():
        w = ck.params[p]
        assert isinstance(w, QuantWeight) and w.scale.dtype == np.float32, p
        np.testing.assert_array_equal(np.asarray(dequantize(w, n, stacked=True, xp=np)), ref.params[p], err_msg=p)
