"""NVIDIA ModelOpt fp8 checkpoints (checkpoints/hf_fp8_config.parse_modelopt): config.json's
quantization_config {"quant_method": "modelopt", "quant_algo": ...} or, in older exports, an
hf_quant_config.json beside config.json. Tiny checkpoints quantized here with numpy / ml_dtypes in
ModelOpt's tensor layouts (FP8: scalar per-tensor weight_scale + input_scale; FP8_PER_CHANNEL_PER_TOKEN:
weight_scale [out]; FP8_PB_WO: weight_scale [out/128, 1, in/128, 1]) load with their projections
kept float8_e4m3fn, equal to the same weights dequantized in numpy (the independent reference), and
their KV scales are read; the other ModelOpt algos are refused in one line naming the field."""
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
from jaxllm.models.quant import QuantWeight, dequantize
from tests.checkpoints.fp8_tiny import make_fp8
from tests.engine_checks import logits_of  # share=True: no trace-time switch changes in this module

PROJ = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": 2, "layers.w_gate": 1, "layers.w_up": 1,
        "layers.w_down": 1}
SEQS = [np.random.default_rng(1).integers(0, 256, n).tolist() for n in (5, 40)]
PRODUCER = {"name": "modelopt", "version": "0.19.0"}
K_SCALES, V_SCALES = [0.02, 0.03], [0.015, 0.05]  # per layer, per tensor


def _hf_quant_config_file(path: str, quantization: dict) -> str:
    """Moves the checkpoint's quantization_config out of config.json into hf_quant_config.json."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
        json.dump({"producer": PRODUCER, "quantization": quantization}, f)
    return path


# name -> (strategy, config.json quantization_config or None, hf_quant_config.json "quantization" or None,
#          stored scale shape, KV scale tensor names or None, the activation quantization not run)
CASES = {
    "fp8": ("tensor", {"quant_method": "modelopt", "quant_algo": "FP8", "producer": PRODUCER, "ignore": ["lm_head"],
                       "kv_cache_scheme": {"type": "float", "num_bits": 8, "dynamic": False}},
            None, lambda s: (), ("self_attn.k_scale", "self_attn.v_scale"), "static fp8 per-tensor"),
    "pcpt-file": ("channel", None, {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8",
                                    "exclude_modules": ["lm_head"]},
                  lambda s: (s.shape[0],), ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
                  "dynamic fp8 per-token"),
    "pb-wo-file": ("block", None, {"quant_algo": "fp8_pb_wo", "kv_cache_quant_algo": None, "exclude_modules": []},
                   lambda s: (s.shape[0], 1, s.shape[1], 1), None, None),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("modelopt"))
    out = {}
    for name, (strategy, qc, quantization, shape, kv, _) in CASES.items():
        kv_scales = dict(zip(kv, (K_SCALES, V_SCALES))) if kv else None
        fp8_dir, ref_dir = make_fp8(root, name, qc or {"quant_method": "modelopt"}, strategy, scale_shape=shape,
                                    input_scale=strategy == "tensor", kv_scales=kv_scales)
        if quantization is not None:
            _hf_quant_config_file(fp8_dir, quantization)
        out[name] = fp8_dir, ref_dir
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_modelopt_loads_fp8_and_matches_numpy_dequantized(name, dirs, caplog):
    strategy, _, _, _, kv, acts = CASES[name]
    fp8_dir, ref_dir = dirs[name]
    with caplog.at_level(logging.INFO, logger="jaxllm.checkpoints"):
        ck = load_checkpoint(fp8_dir)
    ref = load_checkpoint(ref_dir)
    for p, n in PROJ.items():
        w = ck.params[p]
        assert isinstance(w, QuantWeight) and w.q.dtype == ml_dtypes.float8_e4m3fn, p
        assert (w.scale.ndim == w.q.ndim) == (strategy == "block"), p
        np.testing.assert_array_equal(np.asarray(dequantize(w, n, stacked=True, xp=np)), ref.params[p], err_msg=p)
    assert "quant_method 'modelopt'" in caplog.text
    assert ("activation quantization is not run" in caplog.text) == (acts is not None)
    if acts:
        assert f"its {acts} activation quantization" in caplog.text
    if kv:
        k, v, names = ck.kv_scales
        np.testing.assert_array_equal(k, np.repeat(np.asarray(K_SCALES, np.float32)[:, None], 2, axis=1))
        np.testing.assert_array_equal(v, np.repeat(np.asarray(V_SCALES, np.float32)[:, None], 2, axis=1))
        assert names == "/".join(kv)
    else:
        assert ck.kv_scales is None
    mq = build_model(ck.config, ck.params, jnp.float32)
    assert mq.quantization == "fp8"
    want = logits_of(build_model(ref.config, ref.params, jnp.float32), ref.config, SEQS, share=True)
    np.testing.assert_allclose(logits_of(mq, ck.config, SEQS, share=True), want, atol=2e-5 * np.abs(want).max(), rtol=0)


def _with(tmp_path, qc=None, quantization=None, raw_file=None) -> str:
    fp8_dir, _ = make_fp8(str(tmp_path), "refuse", qc or {"quant_method": "modelopt"}, "tensor")
    if quantization is not None or raw_file is not None:
        _hf_quant_config_file(fp8_dir, quantization)
    if raw_file is not None:
        with open(os.path.join(fp8_dir, "hf_quant_config.json"), "w") as f:
            json.dump(raw_file, f)
    return fp8_dir


@pytest.mark.parametrize("qc,quantization,msg", [
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}, None,
     r"config\.json: quantization_config\.quant_algo='NVFP4' is not supported; jaxllm loads ModelOpt's float8 "
     r"weights \(quant_algo FP8, FP8_PER_CHANNEL_PER_TOKEN or FP8_PB_WO\); NVFP4, .* are not$"),
    ({"quant_method": "modelopt_fp4", "quant_algo": "W4A16_NVFP4"}, None,
     r"config\.json: quantization_config\.quant_algo='W4A16_NVFP4' is not supported"),
    ({"quant_method": "modelopt"}, None, r"config\.json: quantization_config\.quant_algo=None is not supported"),
    (None, {"quant_algo": "W4A8_AWQ", "group_size": 128}, r"hf_quant_config\.json: quantization\.quant_algo="
                                                           r"'W4A8_AWQ' is not supported; jaxllm loads ModelOpt's"),
    (None, {"quant_algo": "MXFP8"}, r"hf_quant_config\.json: quantization\.quant_algo='MXFP8' is not supported"),
    (None, {"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"},
     r"hf_quant_config\.json: quantization\.kv_cache_quant_algo='NVFP4' is not supported; jaxllm loads fp8 KV "
     r"cache scales \(FP8\) or none$"),
    ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_scheme": {"type": "int", "num_bits": 8}}, None,
     r"config\.json: quantization_config\.kv_cache_scheme=\{.*\} is not supported; jaxllm loads fp8 KV cache"),
])
def test_other_modelopt_algos_are_refused_in_one_line(tmp_path, qc, quantization, msg):
    d = _with(tmp_path, qc, quantization)
    with pytest.raises(CheckpointError, match=r"^" + str(tmp_path) + r"/refuse/" + msg) as e:
        load_checkpoint(d)
    assert "\n" not in str(e.value)


def test_hf_quant_config_without_quantization_object(tmp_path):
    d = _with(tmp_path, raw_file={"producer": PRODUCER})
    with pytest.raises(CheckpointError, match=r"hf_quant_config\.json: no 'quantization' object"):
        load_checkpoint(d)
