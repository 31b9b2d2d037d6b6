"""AWQ (GEMM), GPTQ and compressed-tensors pack-quantized int4 HF checkpoints (checkpoints/hf_int4.py): tiny checkpoints packed with
numpy in each format's layout (tests/checkpoints/int4_tiny.py) load their projections 4-bit, checked
against the fp32 checkpoint of the same weights ((q - z) * s): weights exact, logits close, greedy
equal; symmetric GPTQ held as int4 without offsets; a layer left unquantized dequantized; refusals
are one line naming the field."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models import quant_dot
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, dequantize
from tests.checkpoints.gguf_tiny import tiny_llama_hd32
from tests.checkpoints.int4_tiny import write_int4
from tests.engine_checks import logits_of

PROJ = ("layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up", "layers.w_down")
SEQS = [[3, 9, 27], list(range(40, 57)), list(range(100, 140))]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("int4"))
    return root, tiny_llama_hd32(root)


CASES = {  # id -> (method, group, sym, checkpoint_format)
    "awq-g32": ("awq", 32, False, None),
    "gptq-sym-g32-v1": ("gptq", 32, True, "gptq"),
    "gptq-asym-g-1-v1": ("gptq", -1, False, "gptq"),
    "gptq-asym-g32-v2": ("gptq", 32, False, "gptq_v2"),
    "ct-sym-g32": ("compressed", 32, True, None),
    "ct-asym-channel": ("compressed", -1, False, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_int4_checkpoint_matches_its_fp32_weights(hf, case, monkeypatch):
    root, src = hf
    method, group, sym, fmt = CASES[case]
    qdir, rdir = write_int4(src, f"{root}/{case}", method, group, sym, fmt or "gptq")
    ck, ref = load_checkpoint(qdir), load_checkpoint(rdir)
    for name in PROJ:
        w = ck.params[name]
        assert isinstance(w, QuantWeight) and w.method == "int4", name
        assert w.q.dtype == (jnp.int4 if sym else jnp.uint4) and (w.offset is None) == sym, name
        nc = 2 if name == "layers.wo" else 1
        np.testing.assert_array_equal(dequantize(w, nc, stacked=True, dtype=np.float32, xp=np), ref.params[name],
                                      err_msg=name)  # (q - z) * s bit for bit
    c = ck.config
    want = logits_of(build_model(c, dict(ref.params), jnp.float32, layer_loop="scan"), c, SEQS)
    assert np.abs(want).max() > 0.5
    for chunked in (True, False):
        monkeypatch.setattr(quant_dot, "ENABLED", chunked)
        got = logits_of(build_model(c, dict(ck.params), jnp.float32, layer_loop="scan"), c, SEQS)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0, err_msg=str(chunked))
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_unquantized_layer_is_dequantized_and_rest_stays_fp32(hf):
    """down_proj left unquantized in layer 1 (modules_to_not_convert): w_down loads fp32 (dequantized
    from layer 0's qweight, layer 1 as stored), the other projections stay 4-bit."""
    root, src = hf
    qdir, rdir = write_int4(src, f"{root}/skip", "gptq", 32, False, skip=("model.layers.1.mlp.down_proj",))
    ck, ref = load_checkpoint(qdir), load_checkpoint(rdir)
    assert not isinstance(ck.params["layers.w_down"], QuantWeight)
    np.testing.assert_allclose(ck.params["layers.w_down"], ref.params["layers.w_down"], rtol=1e-6, atol=1e-7)
    assert isinstance(ck.params["layers.w_gate"], QuantWeight) and ck.params["embed"].dtype == np.float32


@pytest.mark.parametrize("patch,message", [
    ({"bits": 8}, r"quantization_config.bits=8 is not supported; jaxllm loads gptq int4 weights \(bits 4\)$"),
    ({"desc_act": True}, r"quantization_config.desc_act=True is not supported; jaxllm loads GPTQ without act-order "
                         r"\(desc_act false\)$"),
    ({"group_size": 0}, r"quantization_config.group_size=0 is not supported; jaxllm loads a positive group size or -1"),
    ({"checkpoint_format": "marlin"}, r"quantization_config.checkpoint_format='marlin' is not supported"),
    ({"quant_method": "awq", "version": "gemv"}, r"quantization_config.version='gemv' is not supported; jaxllm "
                                                r"loads AWQ's GEMM layout \(version 'gemm'\)$"),
    ({"quant_method": "bitsandbytes"}, r"quantization_config.quant_method='bitsandbytes' is not supported; "
                                       r"jaxllm loads .*'awq' / 'gptq' \(4-bit\)"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32,
                                          "actorder": "group"}}}},
     r"quantization_config.config_groups.g.weights.actorder='group' is not supported; jaxllm loads weights "
     r"without act-order$"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32},
                              "input_activations": {"type": "int", "num_bits": 8}}}},
     r"quantization_config.config_groups.g.input_activations=.* is not supported; jaxllm loads pack-quantized "
     r"int4 weights with unquantized activations \(W4A16\)$"),
])
def test_refusals_are_one_line(hf, patch, message):
    root, src = hf
    qdir, _ = write_int4(src, f"{root}/refuse", "gptq", 32, False)
    with open(os.path.join(qdir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"].update(patch)
    with open(os.path.join(qdir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"config.json: " + message) as e:
        load_checkpoint(qdir)
    assert "\n" not in str(e.value)


def test_act_order_g_idx_is_refused(hf):
    root, src = hf
    qdir, _ = write_int4(src, f"{root}/actorder", "gptq", 32, False)
    from safetensors.numpy import load_file, save_file

    path = os.path.join(qdir, "model.safetensors")
    t = load_file(path)
    name = "model.layers.0.mlp.down_proj.g_idx"
    t[name] = t[name][::-1].copy()
    save_file(t, path)
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.down_proj.g_idx is not i // group_size "
                                              r"\(an act-order checkpoint\); quantization_config.desc_act=true"):
        load_checkpoint(qdir)


def test_int4_config_over_float8_tensors_is_one_line(tmp_path):
    """A GPTQ quantization_config beside float8 weights (an fp8 checkpoint mislabelled): refused,
    not read as unscaled float8 values."""
    from tests.checkpoints.fp8_tiny import make_fp8

    d, _ = make_fp8(str(tmp_path), "f8", {"quant_method": "fp8"}, "tensor")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"model.safetensors: holds float8 tensors \(.*: F8_E4M3\) but .*config.json "
                                              r"says quantization_config.quant_method='gptq' \(int4 qweight/qzeros/scales\)$"):
        load_checkpoint(d)
